"""studies.headstart's tests: on constructed runs whose answer is known, the head start explains C1 or a
dose-response survives it, and the analysis tells the two apart; its measures agree with studies.twins where
they share a definition; the power arithmetic; and the stored runs regenerate the committed report exactly.
Run: make test (or python -m pytest studies/test_headstart.py)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from studies import headstart as hs
from studies import twins
from studies.stats import partial_spearman, sign_flip_p
from studies.store import STORE, load_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: results/
P = 128  # pairs a seed
SEEDS = range(8)  # constructed seeds: the sign-flip test's smallest p is 2^-7


def constructed_run(l0: np.ndarray, overlap: np.ndarray, C1: np.ndarray, control0: np.ndarray,
                    embed_end: float = 0.5) -> list[dict]:
    """The metric rows of a run whose pairs have this head start, cold-start overlap and C1: the cold start,
    then one diagnostic, at iteration 60, where the control falls by 1 in log and the coupled action by 1 - C1, with the
    twins' embedding cosine at the end `embed_end` and the gradient cosine unchanged."""
    a0 = control0 * np.exp(l0)

    def row(it, coupled, control, embed, flawed):
        return {"iter": it, "pair_flawed_probs": coupled.tolist(), "pair_control_probs": control.tolist(),
                "pair_grad_cos": overlap.tolist(), "pair_embed_cos": embed.tolist(), "flawed_rate": flawed}
    return [row(0, a0, control0, overlap, None),
            row(60, a0 * np.exp(C1 - 1), control0 * np.exp(-1), np.full(len(l0), embed_end), 0.1)]


def constructed_seed(seed: int, dose: float) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """A seed of a world where the overlap goes with the head start (as in the stored runs) and
    C1 = 1.2 l0 - 0.5 + dose (overlap - its median) + noise. The control's own starting probability varies by
    two orders of magnitude, so log pi_0(a) alone is a poor stand-in for l0. Returns (rows, l0, C1)."""
    rng = np.random.default_rng(seed)
    l0 = rng.uniform(-2, 3, P)
    overlap = np.clip(0.35 + 0.15 * l0 + rng.normal(0, 0.15, P), -0.3, 1.0)
    C1 = 1.2 * l0 - 0.5 + dose * (overlap - np.median(overlap)) + rng.normal(0, 0.5, P)
    control0 = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), P))
    return constructed_run(l0, overlap, C1, control0), l0, C1


def world(dose: float) -> dict:
    """statistic -> [one value per constructed seed], through the same path as the stored runs."""
    out = {}
    for s in SEEDS:
        rows = constructed_seed(s, dose)[0]
        for k, v in hs.pair_stats(twins.pair_measures(rows), hs.head_start(rows)).items():
            out.setdefault(k, []).append(v)
    return out


# ---------------------------------------------------------------------------------------------
# The stored runs regenerate the committed report (first: the slowest test)
# ---------------------------------------------------------------------------------------------

def test_the_stored_runs_regenerate_the_committed_headstart_report_exactly(tmp_path):
    """results/headstart.md is what the command computes from results/runs/: an analysis change that moves a
    number must regenerate it."""
    out = subprocess.run([sys.executable, "-m", "studies.headstart", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "headstart.md").read_text() == open(os.path.join(ROOT, "results", "headstart.md")).read()
    assert "| **no** |" not in (tmp_path / "headstart.md").read_text()  # every quoted number reproduced


# ---------------------------------------------------------------------------------------------
# The measures, on constructed runs
# ---------------------------------------------------------------------------------------------

def test_l0_is_the_coupled_actions_cold_start_log_probability_over_its_controls():
    rows, l0, C1 = constructed_seed(0, dose=0.0)
    assert hs.head_start(rows) == pytest.approx(l0)
    assert twins.pair_measures(rows)["C1"] == pytest.approx(C1)  # C1 measured from l0 on, as constructed


def test_a_head_start_that_explains_all_of_C1_leaves_no_dose_response_once_l0_is_held_fixed():
    """No dose-response, only a head start that the overlap goes with: the raw rank correlation is strongly
    positive, and holding l0 fixed takes it to about 0. Holding log pi_0(a) fixed instead does not: the
    control's own start matters, which is why l0 is the head start."""
    st = world(dose=0.0)
    assert np.mean(st["rho"]) > 0.6 and sign_flip_p(st["rho"]) == 2 ** -7
    assert abs(np.mean(st["rho_given_l0"])) < 0.05 and sign_flip_p(st["rho_given_l0"]) > 0.2
    assert abs(np.mean(st["overlap_slope"])) < 0.15
    assert np.mean(st["C1_at_l0_zero"]) == pytest.approx(-0.5, abs=0.05)  # the constructed intercept
    assert np.mean(st["rho_given_pi0"]) > 0.5


def test_the_tercile_contrast_keeps_the_head_start_the_terciles_leave():
    """Terciles hold l0 only roughly: with no dose-response, the high-minus-low overlap contrast of C1 within
    l0 terciles is the l0 contrast they leave times C1's slope in l0 (1.2), not 0."""
    st = world(dose=0.0)
    assert np.mean(st["tercile_l0"]) > 0.2
    assert np.mean(st["tercile"]) == pytest.approx(1.2 * np.mean(st["tercile_l0"]), abs=0.1)


def test_a_dose_response_beyond_the_head_start_survives_it():
    """C1 rises with the overlap at fixed l0 (1 per unit overlap): every head-start-free statistic is clearly
    positive on every seed, and the fit finds the constructed slope."""
    st, none = world(dose=1.0), world(dose=0.0)
    assert np.mean(st["rho_given_l0"]) > 0.2 and sign_flip_p(st["rho_given_l0"]) == 2 ** -7
    assert np.mean(st["overlap_slope"]) == pytest.approx(1.0, abs=0.2) and min(st["overlap_slope"]) > 0
    assert np.mean(st["tercile"]) > np.mean(none["tercile"]) + 0.2
    for w in (st, none):  # C1 = 1.2 l0 - 0.5 + dose (overlap - its median): -0.5 at l0 = 0, the median overlap
        assert np.mean(w["C1_at_l0_zero"]) == pytest.approx(-0.5, abs=0.1)


def test_the_manipulation_check_is_the_arm_minus_plain_at_the_end_on_the_same_pairs():
    rows0, l0, C1 = constructed_seed(0, dose=0.0)
    overlap = np.array(rows0[0]["pair_grad_cos"])
    control0 = np.array(rows0[0]["pair_control_probs"])
    rows = constructed_run(l0, overlap, C1 - 0.3 * (overlap > 0.5), control0, embed_end=0.2)
    for r, rate in ((rows0, 0.2), (rows, 0.1)):  # what the endpoint and the held-out success read
        r[-1] |= {"train_flawed_rate": rate, "ood_success_rate": 1 - rate}
    m, plain = twins.pair_measures(rows), twins.pair_measures(rows0)
    visited = np.arange(P) % 2 == 0
    got = hs.against_plain(rows, rows0, m, plain, l0, visited)
    assert got["embed_end"] == pytest.approx(0.2 - 0.5) and got["grad_end"] == pytest.approx(0.0)
    assert got["d"] == pytest.approx(-0.3 * np.mean(overlap > 0.5))
    assert got["d_constructed"] == pytest.approx(-0.3 * np.mean((overlap > 0.5)[~visited]))
    assert got["d_visited"] == pytest.approx(-0.3 * np.mean((overlap > 0.5)[visited]))
    d = m["gain"] - plain["gain"]
    assert got["rho_d_given_l0"] == pytest.approx(partial_spearman(overlap, d, l0))  # l0 held, not log pi_0
    assert got["rho_d_given_l0"] != pytest.approx(partial_spearman(overlap, d, plain["pi0"]))
    assert got["rho_d"] < -0.5  # the arm lowers the gain where the overlap is high
    assert got["endpoint"] == pytest.approx(-0.1) and got["ood_success"] == pytest.approx(0.1)


def test_visited_and_constructed_pairs_split_by_the_pairs_visited_key():
    rows, l0, C1 = constructed_seed(0, dose=0.0)
    visited = np.arange(P) < 40
    st = hs.pair_stats(twins.pair_measures(rows), hs.head_start(rows), visited)
    assert st["visited_share"] == pytest.approx(40 / P)
    assert st["C1_visited"] == pytest.approx(C1[:40].mean()) and st["l0_constructed"] == pytest.approx(l0[40:].mean())


def test_pooled_bins_cut_l0_at_the_edges_with_the_upper_edge_inside():
    l0 = np.array([-1.0, -0.5, 0.0, 0.5, 3.0, 3.5])
    bins = hs.pooled_bins(l0, np.arange(6.0), -np.arange(6.0))
    assert [(name, n) for name, n, _, _ in bins] == [("<= -1", 1), ("(-1, 0]", 2), ("(0, 1]", 1), ("(1, 2]", 0),
                                                     ("(2, 3]", 1), ("> 3", 1)]
    assert bins[1][2] == pytest.approx(1.5) and bins[1][3] == pytest.approx(-1.5) and math.isnan(bins[3][2])


# ---------------------------------------------------------------------------------------------
# Agreement with studies.twins, and the power arithmetic
# ---------------------------------------------------------------------------------------------

def test_the_statistics_it_shares_with_twins_per_seed_are_the_same_numbers():
    """On a stored Kitchen seed: the registered measures coupling.md reports come out identical here."""
    rows = load_rows(os.path.join(ROOT, STORE, "text-plain-seed8201"))
    m = twins.pair_measures(rows)
    mine = hs.pair_stats(m, hs.head_start(rows))
    theirs = twins.per_seed(m, twins.pairs_of("text", 8201))
    for k in ("C1", "rho", "rho_pi0", "rho_given_pi0", "gain", "gain_low6", "gain_high6"):
        assert mine[k] == theirs[k], k


def test_seeds_needed_is_the_normal_approximation_with_the_sign_flip_floor():
    assert hs.fewest_seeds(0.05) == 6 and hs.fewest_seeds(0.005) == 9 and hs.fewest_seeds(2 ** -5) == 6
    assert hs.seeds_needed(1.0, 1.0, 0.05) == 8  # (1.960 + 0.842)^2 = 7.85
    assert hs.seeds_needed(1.0, 10.0, 0.005) == 9  # the normal approximation says 1; the test cannot go below 2^-8
    assert hs.seeds_needed(1.0, 0.0, 0.05) == math.inf
    assert hs.detectable(1.0, 8, 0.05) == pytest.approx(2.8016 / math.sqrt(8), abs=1e-3)

"""What the stored runs already say: the head start, the absolute fall and the manipulation check.
make headstart   (python -m studies.headstart; post hoc and exploratory: this report registers nothing)

It trains nothing. From the stored runs of every matrix whose runs log the 128 sampled twin pairs
(results/PROTOCOL.md: the sampled-pair, channel and repaired-label matrices in results/runs/coupling/, the
MiniGrid replication in results/runs/minigrid/) it computes, per (task, arm, seed), over the pairs i:

  l0_i = log pi_0(a_i | s_flawed) - log mean pi_0(other flawed actions | s_flawed)    (the head start)

beside C1_i, gain_i and the overlap (the cold-start gradient cosine) of studies.twins.pair_measures. C1 starts
from l0 and measures against the same control. In the stored runs the overlap and the head start go together
(why is not known here: the softmax's factor (1 - pi_a) in e_a - pi cancels in a cosine), so a dose-response
in the overlap can be one in l0. Per seed: how much of C1 the head start carries (Spearman(l0, C1); the partial rank correlation of
overlap and C1 with l0 held fixed; the overlap contrast within l0 terciles; a least-squares fit of C1 on l0 and
the overlap); the absolute fall (the gain); Kitchen's pairs whose flawed twin the scripted agent visited
against those built from another goal in the same state; and the manipulation check, each arm minus plain
GRPO on the same pairs: the twins' embedding and gradient cosines at the last iteration, and the gain. Every
p is the exact two-sided sign-flip test over seeds of a per-seed statistic, uncorrected. Last, the power
table for a planned family of mechanism statistics (a normal approximation, and the exact test's power by
simulation).

Writes results/headstart.md and results/headstart.png in about 10 s.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from statistics import NormalDist

import numpy as np

from studies.endpoints import run_numbers
from studies.stats import defined, mean_ci, partial_spearman, sign_flip_p, spearman
from studies.store import PAIRS, STORE, is_stored, load_rows, seed_list
from studies.twins import end_cosines, head_start, pair_measures, pairs_of, stat_cell

MATRICES = {  # key -> (name, folder of its stored runs, its seeds, task -> arms): every matrix that logs the pairs
    "pairs": ("the sampled-pair matrix", STORE, "8201-8210",
              {"text": ("plain", "cls-oracle", "withhold"), "grid": ("plain", "cls-oracle")}),
    "channels": ("the channel matrix", STORE, "8201-8212",
                 {t: ("plain", "cls-oracle", "placebo", "policy") for t in ("text", "grid")}),
    "repaired": ("the repaired-label matrix", STORE, "8201-8212",
                 {t: ("plain", "cls-loop-repaired", "policy-loop-repaired") for t in ("text", "grid", "text-nomask")}),
    "minigrid": ("the MiniGrid replication", "results/runs/minigrid", "8301-8310",
                 {t: ("plain", "cls-oracle") for t in ("lavagap", "doorkey")}),
}
TASK_NAMES = {"text": "Kitchen", "grid": "LavaGrid", "text-nomask": "Kitchen without the action mask",
              "lavagap": "MiniGrid LavaGapS5", "doorkey": "MiniGrid DoorKey-5x5"}
L0_EDGES = (-1, 0, 1, 2, 3)  # the pooled bins of l0: <= -1, (-1, 0], (0, 1], (1, 2], (2, 3], > 3
POWER = 0.8  # the power table's target
ALPHA = 0.05  # the family-wise error rate a mechanism study would hold, with Holm's step-down


# ---------------------------------------------------------------------------------------------
# One seed's pairs: the head start and what C1 keeps once it is held fixed
# ---------------------------------------------------------------------------------------------

def mean_of(x: np.ndarray) -> float:
    """The mean over the defined values; nan where there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def within_terciles(grad: np.ndarray, y: np.ndarray, l0: np.ndarray) -> float:
    """The dose-response in y (C1) with the head start held roughly fixed: in each tercile of l0 (l0 <= its
    1/3 quantile, up to the 2/3 quantile, above), mean y of the pairs above the tercile's median overlap
    minus that of the pairs at or below it; the mean over the three terciles. With y = l0 itself: the head
    start the terciles leave between the halves."""
    ok = ~(np.isnan(y) | np.isnan(l0))
    grad, y, l0 = grad[ok], y[ok], l0[ok]
    third = np.digitize(l0, np.quantile(l0, [1 / 3, 2 / 3]), right=True)                   # (P,) in 0, 1, 2
    diffs = []
    for k in range(3):
        g, c = grad[third == k], y[third == k]
        high = g > np.median(g) if len(g) else g > 0
        if high.any() and (~high).any():
            diffs.append(c[high].mean() - c[~high].mean())
    return float(np.mean(diffs)) if diffs else float("nan")


def no_head_start_fit(grad: np.ndarray, C1: np.ndarray, l0: np.ndarray) -> tuple[float, float]:
    """Least squares C1_i = b0 + b1 l0_i + b2 overlap_i over the pairs. Returns the fitted C1 of a pair with no
    head start (l0 = 0) at the seed's median overlap, b0 + b2 median(overlap), and b2."""
    ok = ~(np.isnan(C1) | np.isnan(l0))
    X = np.column_stack([np.ones(ok.sum()), l0[ok], grad[ok]])                            # (P, 3)
    b = np.linalg.lstsq(X, C1[ok], rcond=None)[0]
    return float(b[0] + b[2] * np.median(grad)), float(b[2])


def pair_stats(m: dict, l0: np.ndarray, visited: np.ndarray | None = None) -> dict:
    """One seed's statistics over its pairs (m: twins.pair_measures of the run). `visited` (Kitchen): True
    where the flawed twin is the state the sampler's scripted agent visited, False where it is another goal
    in the visited state (constructed)."""
    grad, C1, gain = m["grad"], m["C1"], m["gain"]
    at_zero, slope = no_head_start_fit(grad, C1, l0)
    out = {"l0": mean_of(l0), "rho_l0": spearman(l0, C1), "rho": spearman(grad, C1),
           "rho_pi0": spearman(grad, m["pi0"]), "rho_overlap_l0": spearman(grad, l0),
           "rho_given_pi0": partial_spearman(grad, C1, m["pi0"]), "rho_given_l0": partial_spearman(grad, C1, l0),
           "tercile": within_terciles(grad, C1, l0),
           "tercile_l0": within_terciles(grad, l0, l0), "C1_at_l0_zero": at_zero, "overlap_slope": slope,
           "C1": mean_of(C1), "gain": float(gain.mean()),
           "gain_low6": float(gain[grad <= np.quantile(grad, 1 / 6)].mean()),
           "gain_high6": float(gain[grad >= np.quantile(grad, 5 / 6)].mean())}
    if visited is not None:
        out["visited_share"] = float(visited.mean())
        for side, keep in (("visited", visited), ("constructed", ~visited)):
            out |= {f"C1_{side}": mean_of(C1[keep]), f"rho_{side}": spearman(grad[keep], C1[keep]),
                    f"l0_{side}": mean_of(l0[keep])}
    return out


def against_plain(rows: list[dict], plain_rows: list[dict], m: dict, plain: dict, l0: np.ndarray,
                  visited: np.ndarray | None = None) -> dict:
    """The manipulation check, an arm minus the same seed's plain run on the same pairs: the twins' embedding
    and gradient cosines at the last iteration; the change of the gain, d_i = gain_i - gain_i(plain), and its
    rank correlation with the cold-start overlap (rho_d: H3/H4 of the sampled-pair matrix), also with l0
    held fixed; on Kitchen d over the visited and the constructed flawed twins; and the endpoint flawed
    rate and the held-out success (studies.endpoints)."""
    (embed, grad), (embed0, grad0) = end_cosines(rows), end_cosines(plain_rows)
    d = m["gain"] - plain["gain"]
    arm, base = run_numbers(rows), run_numbers(plain_rows)
    out = {"embed_end": mean_of(embed) - mean_of(embed0), "grad_end": mean_of(grad) - mean_of(grad0),
           "d": float(d.mean()), "rho_d": spearman(plain["grad"], d),
           "rho_d_given_l0": partial_spearman(plain["grad"], d, l0),
           "endpoint": arm["endpoint"] - base["endpoint"], "ood_success": arm["ood_success"] - base["ood_success"]}
    if visited is not None:
        out |= {"d_visited": float(d[visited].mean()), "d_constructed": float(d[~visited].mean())}
    return out


def pooled_bins(l0: np.ndarray, C1: np.ndarray, gain: np.ndarray) -> list[tuple[str, int, float, float]]:
    """Pairs pooled over seeds, by l0 bin (L0_EDGES): (bin, pairs, mean C1, mean gain)."""
    edges = (-np.inf,) + L0_EDGES + (np.inf,)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        keep = (l0 > lo) & (l0 <= hi)
        name = f"<= {hi:g}" if lo == -np.inf else (f"> {lo:g}" if hi == np.inf else f"({lo:g}, {hi:g}]")
        out.append((name, int(keep.sum()), mean_of(C1[keep]), mean_of(gain[keep])))
    return out


# ---------------------------------------------------------------------------------------------
# The stored runs of a matrix, seed by seed
# ---------------------------------------------------------------------------------------------

def stored_run(store_dir: str, task: str, arm: str, seed: int) -> tuple[list[dict], int] | None:
    """(metric rows, iterations) of a stored run that logged this seed's pairs; None where none is stored."""
    d = os.path.join(store_dir, f"{task}-{arm}-seed{seed}")
    if not is_stored(d):
        return None
    with open(os.path.join(d, "config.json")) as f:
        saved = json.load(f)
    if saved["seed"] != seed or saved.get("twin_pairs") != PAIRS:
        raise ValueError(f"{d}: not a run of seed {seed} with {PAIRS} sampled pairs")
    return load_rows(d), saved["iters"]


@functools.cache
def kitchen_visited(seed: int) -> np.ndarray:
    """(P,) bool: True where the flawed twin is the side the sampler's agent visited (every Kitchen task of a
    seed logs the same pairs, twins.pairs_of)."""
    return np.array([p["visited"] == "flawed" for p in pairs_of("text", seed)])


def one_seed(store_dir: str, task: str, arms, seed: int) -> dict:
    """arm -> (its statistics, its per-pair arrays, its iterations) on one seed, for the arms stored beside
    the plain run; {} where the plain run is not stored."""
    runs = {arm: stored_run(store_dir, task, arm, seed) for arm in arms}
    if runs["plain"] is None:
        return {}
    rows0 = runs["plain"][0]
    plain, l0 = pair_measures(rows0), head_start(rows0)
    visited = kitchen_visited(seed) if task.startswith("text") else None
    if visited is not None and len(visited) != len(l0):
        raise ValueError(f"{task} seed {seed}: the run logged {len(l0)} pairs, the sampler gives {len(visited)}")
    out = {}
    for arm in [a for a in arms if runs[a] is not None]:
        rows = runs[arm][0]
        m = plain if arm == "plain" else pair_measures(rows)
        if not (np.array_equal(m["pi0"], plain["pi0"]) and np.array_equal(m["grad"], plain["grad"])
                and np.array_equal(head_start(rows), l0, equal_nan=True)):
            raise ValueError(f"{task} {arm} seed {seed} did not start from the plain run's cold start")
        row = pair_stats(m, l0, visited)
        if arm != "plain":
            row |= against_plain(rows, rows0, m, plain, l0, visited)
        out[arm] = (row, {"l0": l0, "C1": m["C1"], "gain": m["gain"], "grad": plain["grad"]}, runs[arm][1])
    return out


def analyse(key: str) -> dict:
    """A matrix's numbers: stats (task, arm) -> {statistic: [one value per seed]}, pooled (task, arm) ->
    {measure: the pairs of every seed, concatenated}, the missing (task, arm, seed) cells, its seeds and length."""
    _, store_dir, seeds, arms_of = MATRICES[key]
    seeds = seed_list(seeds)
    stats, pooled, missing, iters = {}, {}, [], set()
    for task, arms in arms_of.items():
        for s in seeds:
            got = one_seed(store_dir, task, arms, s)  # every arm missing where the plain run is
            missing += [(task, a, s) for a in arms if a not in got]
            for arm, (row, arrays, n_iters) in got.items():
                iters.add(n_iters)
                for k, v in row.items():
                    stats.setdefault((task, arm), {}).setdefault(k, []).append(v)
                for k, v in arrays.items():
                    pooled.setdefault((task, arm), {}).setdefault(k, []).append(v)
    pooled = {cell: {k: np.concatenate(v) for k, v in arrays.items()} for cell, arrays in pooled.items()}
    return {"stats": stats, "pooled": pooled, "missing": missing, "seeds": seeds, "iters": sorted(iters)}


# ---------------------------------------------------------------------------------------------
# Power for a mechanism study: seeds needed, by a normal approximation, and the exact test's power
# ---------------------------------------------------------------------------------------------

def fewest_seeds(alpha: float) -> int:
    """The fewest seeds whose exact sign-flip test can reach alpha at all: its smallest p is 2^(1-n)."""
    return math.ceil(1 + math.log2(1 / alpha) - 1e-12)


def detectable(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest mean shift n seeds detect with the given power by a two-sided test at level alpha, in the
    normal approximation: (z_{1-alpha/2} + z_power) sd / sqrt(n)."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float, alpha: float, power: float = POWER) -> float:
    """The seeds that detect `effect`: ((z_{1-alpha/2} + z_power) sd / effect)^2 rounded up, and at least
    fewest_seeds(alpha); inf for no effect."""
    if effect == 0:
        return math.inf
    z = NormalDist().inv_cdf
    return max(math.ceil(((z(1 - alpha / 2) + z(power)) * sd / abs(effect)) ** 2), fewest_seeds(alpha))


def exact_power(effect: float, sd: float, n: int, alpha: float, draws: int = 4000) -> float:
    """The power of the exact two-sided sign-flip test (stats.sign_flip_p) at level alpha with n seeds, where
    the per-seed values are normal with mean `effect` and this sd: the share of `draws` simulated sets of n
    seeds it rejects (a fixed generator, so the report regenerates byte for byte)."""
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)                  # (2^n, n) of +-1
    v = np.random.default_rng(0).normal(effect, sd, size=(draws, n))                    # (draws, n)
    p = (np.abs(v @ signs.T) >= np.abs(v.sum(1, keepdims=True)) * (1 - 1e-12)).mean(1)   # (draws,)
    return float((p <= alpha).mean())


PLANNED = [  # a planned family of mechanism statistics, as assumed here: (statistic, matrix, task, arm, key)
    ("dose-response, head start held fixed: partial rho(overlap, C1 | l0), plain", "pairs", "text", "plain",
     "rho_given_l0"),
    ("the same on LavaGrid", "pairs", "grid", "plain", "rho_given_l0"),
    ("the classifier flattens it: rho_d (H3 of the sampled-pair matrix), classifier", "pairs", "text", "cls-oracle", "rho_d"),
    ("the same on LavaGrid (H4)", "pairs", "grid", "cls-oracle", "rho_d"),
    ("manipulation check: gradient cosine at the end, classifier - plain", "channels", "text", "cls-oracle",
     "grad_end"),
    ("the same on LavaGrid", "channels", "grid", "cls-oracle", "grad_end"),
    ("endpoint flawed rate, classifier - plain", "channels", "text", "cls-oracle", "endpoint"),
    ("the same on LavaGrid", "channels", "grid", "cls-oracle", "endpoint"),
    ("final held-out success, classifier - plain", "channels", "text", "cls-oracle", "ood_success"),
    ("the same on LavaGrid", "channels", "grid", "cls-oracle", "ood_success"),
]


def power_lines(results: dict) -> list[str]:
    """The power table: each planned statistic's seed-to-seed spread in the stored runs, what 10 seeds detect,
    and the seeds that detect the mean the stored runs show, with Holm over the planned family."""
    k = len(PLANNED)
    holm_first = ALPHA / k  # Holm's first step; every later step tests at a larger level
    lines = [f"A mechanism study's planned family is assumed to be these {k} statistics, each an exact sign-flip "
             f"test over seeds, Holm at {ALPHA:g} over the {k}. Seeds needed come from a normal approximation to "
             f"that test, n = ((z_(1-a/2) + z_{POWER:g}) sd / effect)^2, at a = {ALPHA:g} / {k} = {holm_first:.4f} "
             f"(Bonferroni's level, which Holm's first step uses and every later step exceeds: enough for each "
             f"hypothesis whatever the others show), with sd the seed-to-seed standard deviation of the per-seed statistic in the stored runs; "
             f"and at least {fewest_seeds(holm_first)}, the fewest seeds whose sign-flip test can reach "
             f"{holm_first:.4f} at all (its smallest p is 2^(1-n)). The effect is the mean the stored runs show "
             f"(observed-effect power). Three cautions: the normal approximation overstates the power of the "
             f"exact test at these seed counts, which the last column shows by simulating that test at 10 seeds "
             f"({holm_first:.4f}, normal per-seed values with the stored mean and sd, 4000 draws); each sd comes "
             f"from only 10-12 seeds (a 95% interval of roughly 0.7 to 1.8 times the value); and an observed "
             f"mean is a noisy guess of the effect a new study would face.", "",
             f"| planned statistic | task | stored: mean (seeds) | seed-to-seed sd | 10 seeds detect, {ALPHA:g} alone "
             f"| 10 seeds detect, Holm over {k} | seeds to detect the stored mean, Holm over {k} | the exact test's "
             f"power at 10 seeds for the stored mean, Holm over {k} |",
             "|---|---|---|---|---|---|---|---|"]
    for what, matrix, task, arm, key in PLANNED:
        v = defined(results[matrix]["stats"][(task, arm)][key])
        sd = float(np.std(v, ddof=1))
        n = seeds_needed(sd, float(np.mean(v)), holm_first)
        lines.append(f"| {what} | {TASK_NAMES[task]} | {np.mean(v):+.3f} ({len(v)}, {MATRICES[matrix][0]}) | "
                     f"{sd:.3f} | {detectable(sd, 10, ALPHA):.3f} | {detectable(sd, 10, holm_first):.3f} | "
                     f"{'more than 1000' if n > 1000 else n} | {exact_power(float(np.mean(v)), sd, 10, holm_first):.2f} |")
    v = defined(results["pairs"]["stats"][("text", "cls-oracle")]["rho_d"])
    sd = float(np.std(v, ddof=1))
    sign = "opposite in sign to the paper's prediction" if np.mean(v) > 0 else "the sign the paper predicts"
    lines += ["", f"Headline: rho_d, the flattening statistic registered as H3, varies by {sd:.2f} from seed to seed on "
              f"Kitchen, so 10 seeds detect a shift of {detectable(sd, 10, ALPHA):.2f} at 5% alone and of "
              f"{detectable(sd, 10, holm_first):.2f} under Holm over {k}; detecting the mean the stored runs show "
              f"({np.mean(v):+.3f}, {sign}) under Holm would take {seeds_needed(sd, float(np.mean(v)), holm_first)} "
              f"seeds by the approximation, more with the exact test (at 10 seeds its simulated power for that mean "
              f"is {exact_power(float(np.mean(v)), sd, 10, holm_first):.2f})."]
    return lines


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

ROWS = [  # (statistic, what it means, in one line); each a per-seed statistic over the 128 pairs
    ("l0", "mean l0: how far above its control the coupled action starts at the flawed twin (log)"),
    ("rho_l0", "Spearman(l0, C1): C1 follows the head start"),
    ("rho", "Spearman(overlap, C1): the dose-response (for plain GRPO on the sampled-pair matrix, H1/H2's rho)"),
    ("rho_overlap_l0", "Spearman(overlap, l0): the overlap goes with the head start"),
    ("rho_pi0", "Spearman(overlap, log pi_0(a | s_flawed))"),
    ("rho_given_pi0", "partial Spearman(overlap, C1 | log pi_0): the dose-response, pi_0(a) held fixed"),
    ("rho_given_l0", "partial Spearman(overlap, C1 | l0): the dose-response, the head start held fixed"),
    ("tercile", "C1 above minus at or below the median overlap, within l0 terciles (mean of three)"),
    ("tercile_l0", "the same for l0 itself: the head start the terciles leave between the two halves"),
    ("C1_at_l0_zero", "fitted C1 at l0 = 0 and the seed's median overlap (least squares on l0 and overlap)"),
    ("overlap_slope", "that fit's overlap coefficient: C1 per unit overlap, l0 held fixed"),
    ("C1", "mean C1: the coupled action's change against its control"),
    ("gain", "mean gain: the coupled action's own change of log pi at the flawed twin (the absolute fall)"),
    ("gain_low6", "mean gain, the sixth of pairs with the lowest overlap"),
    ("gain_high6", "mean gain, the sixth with the highest overlap"),
    ("visited_share", "share of pairs whose flawed twin the scripted agent visited"),
    ("C1_visited", "mean C1, visited flawed twins"),
    ("rho_visited", "Spearman(overlap, C1), visited flawed twins"),
    ("l0_visited", "mean l0, visited flawed twins"),
    ("C1_constructed", "mean C1, constructed flawed twins (another goal in the visited state)"),
    ("rho_constructed", "Spearman(overlap, C1), constructed flawed twins"),
    ("l0_constructed", "mean l0, constructed flawed twins"),
    ("embed_end", "arm minus plain: the twins' embedding cosine at the last iteration (mean over pairs)"),
    ("grad_end", "arm minus plain: the twins' gradient cosine at the last iteration"),
    ("d", "arm minus plain: the change of the gain, mean over pairs"),
    ("rho_d", "Spearman(overlap, that change): the flattening statistic (for the classifier on the sampled-pair matrix, H3/H4)"),
    ("rho_d_given_l0", "the same, l0 held fixed"),
    ("d_visited", "arm minus plain: the change of the gain, visited flawed twins"),
    ("d_constructed", "the same, constructed flawed twins (states the scripted agent did not reach under that goal)"),
    ("endpoint", "arm minus plain: training flawed rate, mean over iterations 51-60"),
    ("ood_success", "arm minus plain: final held-out success"),
]
# measures of the cold start, which every arm of a seed shares: shown in plain's column only
COLD = {"l0", "rho_overlap_l0", "rho_pi0", "tercile_l0", "visited_share", "l0_visited", "l0_constructed"}
QUOTED = [  # the numbers the findings quote, at the digits they quote them: (what, as quoted, matrix, task, arm,
    # statistic, how it is computed)
    ("mean l0", "+1.18", "pairs", "text", "plain", "l0", "mean"),
    ("Spearman(l0, C1)", "+0.73", "pairs", "text", "plain", "rho_l0", "mean"),
    ("Spearman(overlap, C1)", "+0.49", "pairs", "text", "plain", "rho", "mean"),
    ("Spearman(overlap, log pi_0)", "0.56", "pairs", "text", "plain", "rho_pi0", "mean"),
    *[(f"C1, l0 {edge}", shown, "pairs", "text", "plain", "C1", f"bin{i}") for i, (edge, shown) in
      enumerate(zip(("<= -1", "in (-1, 0]", "in (0, 1]", "in (1, 2]", "in (2, 3]", "> 3"),
                    ("-2.22", "-1.40", "-0.34", "+1.37", "+2.94", "+3.50")))],
    ("fitted C1 at l0 = 0", "-0.58", "pairs", "text", "plain", "C1_at_l0_zero", "mean"),
    ("its p", "0.002", "pairs", "text", "plain", "C1_at_l0_zero", "p"),
    ("partial rho(overlap, C1 | log pi_0)", "+0.15", "pairs", "text", "plain", "rho_given_pi0", "mean"),
    ("its p", "0.016", "pairs", "text", "plain", "rho_given_pi0", "p"),
    ("partial rho(overlap, C1 | l0)", "+0.17", "pairs", "text", "plain", "rho_given_l0", "mean"),
    ("its p", "0.008", "pairs", "text", "plain", "rho_given_l0", "p"),
    ("high minus low overlap within l0 terciles", "+0.56", "pairs", "text", "plain", "tercile", "mean"),
    ("its p", "0.008", "pairs", "text", "plain", "tercile", "p"),
    ("mean gain (the absolute fall)", "-1.68", "pairs", "text", "plain", "gain", "mean"),
    ("mean gain, the highest-overlap sixth", "-0.35", "pairs", "text", "plain", "gain_high6", "mean"),
    ("share of visited flawed twins", "41%", "pairs", "text", "plain", "visited_share", "mean"),
    ("C1, visited flawed twins", "-0.35 ± 0.34", "pairs", "text", "plain", "C1_visited", "ci"),
    ("Spearman(overlap, C1), visited", "+0.37", "pairs", "text", "plain", "rho_visited", "mean"),
    ("C1, constructed flawed twins", "+1.66", "pairs", "text", "plain", "C1_constructed", "mean"),
    ("l0, constructed flawed twins", "1.76", "pairs", "text", "plain", "l0_constructed", "mean"),
    ("embedding cosine at the end, arm - plain", "-0.019", "channels", "text", "cls-oracle", "embed_end", "mean"),
    ("its p", "0.17", "channels", "text", "cls-oracle", "embed_end", "p"),
    ("gradient cosine at the end, arm - plain", "-0.012", "channels", "text", "cls-oracle", "grad_end", "mean"),
    ("its p", "0.43", "channels", "text", "cls-oracle", "grad_end", "p"),
    ("embedding cosine at the end, arm - plain", "-0.154", "channels", "grid", "cls-oracle", "embed_end", "mean"),
    ("its p", "0.0005", "channels", "grid", "cls-oracle", "embed_end", "p"),
    ("gradient cosine at the end, arm - plain", "-0.108", "channels", "grid", "cls-oracle", "grad_end", "mean"),
    ("its p", "0.0005", "channels", "grid", "cls-oracle", "grad_end", "p"),
    ("embedding cosine at the end, arm - plain", "-0.119", "channels", "grid", "policy", "embed_end", "mean"),
    ("gradient cosine at the end, arm - plain", "-0.119", "channels", "grid", "policy", "grad_end", "mean"),
    ("change of the gain, constructed flawed twins", "-0.066", "channels", "text", "cls-oracle", "d_constructed",
     "mean"),
    ("its p", "0.21", "channels", "text", "cls-oracle", "d_constructed", "p"),
    ("change of the gain, constructed flawed twins", "-0.138", "channels", "text", "placebo", "d_constructed",
     "mean"),
    ("rho_d: seed-to-seed standard deviation", "0.19", "pairs", "text", "cls-oracle", "rho_d", "sd"),
    ("the shift 10 seeds detect (80%, 5% alone)", "0.17", "pairs", "text", "cls-oracle", "rho_d", "mde"),
]
HOW = {"mean": "mean over seeds of the per-seed value", "p": "sign-flip p over seeds",
       "ci": "mean ± 95% t half-width over seeds", "sd": "standard deviation over seeds",
       "mde": "normal approximation, from that sd", "bin": "pooled: the pairs of every seed"}


def recomputed(results: dict, matrix: str, task: str, arm: str, key: str, how: str):
    """One of the quoted numbers from this analysis, computed as `how` says (HOW)."""
    if how.startswith("bin"):
        cell = results[matrix]["pooled"][(task, arm)]
        return pooled_bins(cell["l0"], cell["C1"], cell["gain"])[int(how[3:])][2]
    v = defined(results[matrix]["stats"][(task, arm)][key])
    sd = float(np.std(v, ddof=1))
    return {"mean": float(np.mean(v)), "p": sign_flip_p(v), "ci": mean_ci(v), "sd": sd,
            "mde": detectable(sd, 10, ALPHA)}[how]


def as_shown(value, shown: str) -> str:
    """`value` written with the digits and the sign convention of `shown`, so that the two compare as text."""
    if " ± " in shown:
        return " ± ".join(as_shown(x, s) for x, s in zip(value, shown.split(" ± ")))
    if shown.endswith("%"):
        return f"{100 * value:.0f}%"
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:+.{decimals}f}" if shown[0] in "+-" else f"{value:.{decimals}f}"


def quoted_lines(results: dict) -> list[str]:
    lines = ["| number | where | quoted | here | same at the digits quoted | how |", "|---|---|---|---|---|---|"]
    for what, shown, matrix, task, arm, key, how in QUOTED:
        here = as_shown(recomputed(results, matrix, task, arm, key, how), shown)
        lines.append(f"| {what} | {TASK_NAMES[task]}, {arm}, {MATRICES[matrix][0]} | {shown} | {here} | "
                     f"{'yes' if here == shown else '**no**'} | {HOW[how.rstrip('0123456789')]} |")
    return lines


def bin_cell(n: int, C1: float, gain: float) -> str:
    return "no pairs" if n == 0 else f"{C1:+.2f} / {gain:+.2f} ({n})"


def matrix_lines(key: str, result: dict) -> list[str]:
    """One matrix: a table a task, the arms as columns, a row a statistic, then the pooled l0 bins."""
    name, store_dir, _, arms_of = MATRICES[key]
    seeds, n = result["seeds"], len(result["seeds"])
    lines = ["", f"## {name[0].upper() + name[1:]}: {store_dir}/, seeds {seeds[0]}-{seeds[-1]}, "
             f"{'/'.join(str(i) for i in result['iters'])}-iteration runs"]
    if result["missing"]:
        lines += ["", "Missing runs (reported, never replaced): " + ", ".join(f"{t} {a} seed {s}"
                                                                           for t, a, s in result["missing"])]
    for task, arms in arms_of.items():
        stats = {arm: result["stats"].get((task, arm), {}) for arm in arms}
        lines += ["", f"### {TASK_NAMES[task]} ({task})", "", "| statistic | " + " | ".join(arms) + " |",
                  "|---" * (len(arms) + 1) + "|"]
        for k, text in ROWS:
            cells = [stat_cell(stats[arm][k], n) if k in stats[arm] and (arm == "plain" or k not in COLD) else ""
                     for arm in arms]
            if any(cells):
                lines.append(f"| {text} | " + " | ".join(cells) + " |")
        bins = {arm: pooled_bins(**{k: result["pooled"][(task, arm)][k] for k in ("l0", "C1", "gain")})
                for arm in arms if (task, arm) in result["pooled"]}
        for i, edge in enumerate(b[0] for b in next(iter(bins.values()))):
            cells = [bin_cell(*bins[a][i][1:]) if a in bins else "" for a in arms]
            lines.append(f"| pooled over seeds, l0 {edge}: mean C1 / mean gain (pairs) | " + " | ".join(cells) + " |")
    return lines


def definition_lines(results: dict) -> list[str]:
    """What each measure is, in a line or two; whether any pair's C1 is undefined is read from the runs."""
    cells = [cell for r in results.values() for cell in r["pooled"].values()]
    undefined = sum(int(np.isnan(c["C1"]).sum()) for c in cells)
    total = sum(len(c["C1"]) for c in cells)
    return [
        "- **Pairs, overlap, C1, gain**: as results/PROTOCOL.md defines them (studies.twins.pair_measures). The "
        "overlap is the cosine of the gradients of log pi(a | s_good) and log pi(a | s_flawed) at the cold start; "
        "C1 is the training mean of log pi(a | s_flawed) - log mean pi(other flawed actions | s_flawed) minus its "
        "cold-start value; the gain is the same change of log pi(a | s_flawed) alone.",
        "- **l0 (the head start)** = log pi_0(a | s_flawed) - log mean pi_0(other flawed actions | s_flawed), from "
        "the probabilities iteration 0 logs (pair_flawed_probs, pair_control_probs): C1's own starting point. "
        "In the stored runs the overlap and the head start go together (the Spearman(overlap, l0) rows); why is "
        "not known here. The softmax alone does not make it: grad log pi(a | s) contracts the logits' Jacobian "
        "with e_a - pi = (1 - pi_a)(e_a - q), q the distribution over the other actions, and (1 - pi_a) cancels "
        "in a cosine.",
        "- **Visited and constructed flawed twins** (Kitchen, the pair's `visited` key): Kitchen's sampler takes a "
        "state its scripted agent visited under one training goal and sets it beside the same state under "
        "another goal. Visited: the flawed twin is the visited side. Constructed: the good twin was visited, and "
        "the flawed twin is the same state under another goal, which that goal's agent may never reach.",
        "- **The manipulation check**: an arm minus plain GRPO of the same seed, on the same pairs, at the last "
        "iteration (60): the twins' mean embedding and gradient cosines (logged at the cold start and the end), "
        "and the change of the gain (d).",
        "- **Per seed, then over seeds**: each statistic is computed over one seed's 128 pairs, then averaged "
        "over seeds, equal weight a seed; a row marked pooled puts the pairs of every seed together instead. "
        + ("l0 and C1 are defined on every pair of every run read here, so the pooled and per-seed means of l0 "
           "and C1 agree." if undefined == 0 else
           f"C1 is undefined on {undefined} of the {total} pairs of the runs read here (no other flawed action "
           f"at s_flawed); every statistic leaves them out."),
        "- **Within terciles**: a seed's pairs split at the 1/3 and 2/3 quantiles of l0 (l0 <= q1, q1 < l0 <= q2, "
        "l0 > q2); in each third, mean C1 above the third's median overlap minus at or below it; the mean of "
        "the three. The terciles hold l0 only roughly: the next row gives the l0 by which the two halves still "
        "differ, and a head start alone, with no dose-response, yields a contrast of about that difference times "
        "C1's slope in l0 (studies/test_headstart.py).",
        "- **The fit**: least squares C1 = b0 + b1 l0 + b2 overlap over a seed's pairs, read at l0 = 0 and the "
        "seed's median overlap. Its overlap coefficient b2, like the partial rank correlation with l0 held fixed, "
        "is near 0 where the head start alone drives C1 (studies/test_headstart.py).",
    ]


def report(results: dict) -> str:
    lines = ["Generated by `python -m studies.headstart` (`make headstart`, part of `make tables`) from the stored "
             "runs in results/runs/coupling/ and results/runs/minigrid/; it trains nothing. **Post hoc and "
             "exploratory: this report registers nothing.** Some rows repeat statistics that results/PROTOCOL.md "
             "registers (the endpoint contrasts of channels.md and repaired.md; the mean C1, rho and rho_d behind "
             "H1-H4 of coupling.md and M1-M4 of minigrid.md): their verdicts are those reports', with Holm's "
             "correction, and nothing here changes them. The channel and repaired-label matrices reuse the "
             "sampled-pair matrix's plain runs on Kitchen and LavaGrid (seeds 8201-8210), so their plain "
             "columns are not replications. Each cell: the mean over the seeds of the per-seed statistic ± the half-width of "
             "its 95% Student-t interval, then the exact two-sided sign-flip p over the seeds (the registered "
             "families' test), uncorrected: read no p here as a finding.", "", "## What the numbers are", ""]
    lines += definition_lines(results)
    lines += ["", "## The numbers the findings quote, recomputed", ""] + quoted_lines(results)
    lines += ["", "## Power for a mechanism study", ""] + power_lines(results)
    for key in MATRICES:
        lines += matrix_lines(key, results[key])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The figure, and main
# ---------------------------------------------------------------------------------------------

def plot(pooled: dict, path: str, tasks=("text", "grid")):
    """C1 (left) and the gain (right) of every pair against its head start l0, plain GRPO, the pairs of every
    seed together, coloured by the third of the overlap they fall in; each line is one third's means in the l0
    bins. Where the lines part at one l0, the overlap acts beyond the head start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        cell = pooled[(task, "plain")]
        cuts = np.quantile(cell["grad"], [1 / 3, 2 / 3])
        third = np.digitize(cell["grad"], cuts, right=True)                                   # (N,) 0, 1, 2
        l0_bin = np.digitize(cell["l0"], L0_EDGES, right=True)                                 # pooled_bins' bins
        bounds = [cell["grad"].min(), *cuts, cell["grad"].max()]
        for col, key in enumerate(("C1", "gain")):
            ax = axes[row, col]
            for k, colour in enumerate(("tab:grey", "tab:orange", "tab:red")):
                keep = third == k
                ax.scatter(cell["l0"][keep], cell[key][keep], s=4, alpha=0.2, color=colour)
                at = [b for b in range(len(L0_EDGES) + 1) if (keep & (l0_bin == b)).sum() >= 5]
                ax.plot([cell["l0"][keep & (l0_bin == b)].mean() for b in at],
                        [mean_of(cell[key][keep & (l0_bin == b)]) for b in at], "o-", color=colour,
                        label=f"overlap {bounds[k]:.2f} to {bounds[k + 1]:.2f} (bin means)")
            ax.axhline(0, color="grey", lw=0.8)
            ax.axvline(0, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("l0: log pi_0(a | s_flawed) over its control's (the head start)", fontsize=8)
            ax.set_ylabel({"C1": "C1: change against the control", "gain": "gain: change of log pi(a | s_flawed)"}[key],
                          fontsize=8)
            ax.set_title(f"{TASK_NAMES[task]}, plain GRPO: {len(cell['l0'])} pairs, every seed", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.headstart",
                                description="The head start, the absolute fall and the manipulation check, from "
                                "the stored runs (post hoc, exploratory; trains nothing)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results", help="folder for headstart.md and headstart.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = {key: analyse(key) for key in MATRICES}
    text = report(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "headstart.md"), "w") as f:
        f.write("# What the stored runs already say: the head start, the absolute fall and the manipulation "
                "check\n\n" + text + "\n")
    plot(results["pairs"]["pooled"], os.path.join(args.out, "headstart.png"))
    print(text)


if __name__ == "__main__":
    main()

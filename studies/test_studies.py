"""The studies' tests: the stored runs regenerate every committed report, the statistics, the run
storage, the per-pair analysis, the paper's claims, and each matrix trains the arms its protocol names.
Run: make test (or python -m pytest studies/)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import grpo_cls as g
from studies import (arms, bench, channels, claims, compare, demo, endpoints, explain, mechanism, repaired, replicate,
                     stats, store, toys, twins)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: results/, docs/
needs_minigrid = pytest.mark.skipif(importlib.util.find_spec("minigrid") is None, reason="pip install minigrid")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread_per_worker():
    """make test runs two single-thread workers on two cores; a test that took a second thread would
    slow both workers many times over."""
    yield
    assert torch.get_num_threads() == 1, "this test left torch with more than one thread"


def tiny(**kw):
    """A tiny arm config: the tests' runs take seconds."""
    base = dict(env="text", iters=2, tasks_per_iter=2, num_generations=2, eval_tasks=4, eval_every=1,
                sft_steps=2, threads=1, d_model=32, out="", twin_pairs=4)
    return arms.ArmConfig(**(base | kw))


MEASURED = ("wall_s", "rss_mib", "peak_rss_mib", "time_rollout_s", "time_update_s", "time_eval_s", "time_diag_s")


def rows_without_wall_time(run_dir):
    """Every metric but the clock and memory readings, which no run can repeat."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


# ---------------------------------------------------------------------------------------------
# The stored runs regenerate every committed report exactly (the slowest tests, first, so that the
# two workers of make test finish together)
# ---------------------------------------------------------------------------------------------

def regenerate(tmp_path, study: str, args: list[str], report: str):
    """Run `python -m studies.STUDY --tables` on the stored runs into tmp_path; its report must equal the
    committed one."""
    out = subprocess.run([sys.executable, "-m", f"studies.{study}", *args, "--tables", "--no-doc", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / report).read_text() == open(os.path.join(ROOT, "results", report)).read(), report


@pytest.mark.parametrize("study, report", [("coupling", "coupling.md"), ("channels", "channels.md"),
                                           ("repaired", "repaired.md")])
def test_the_stored_runs_regenerate_the_committed_report_exactly(tmp_path, study, report):
    """results/coupling.md, channels.md and repaired.md are what --tables computes from results/runs/:
    an analysis change that moves a number must regenerate them (and the README's numbers with them)."""
    regenerate(tmp_path, study, [], report)


def test_the_stored_demo_pairs_regenerate_the_committed_demo_report_exactly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "studies.demo", "--tables", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "demo.md").read_text() == open(os.path.join(ROOT, "results", "demo.md")).read()


def test_each_tasks_pairs_come_from_its_own_envs_sampler():
    """The pairs a report reads for a task are the ones that task's runs logged: Kitchen's for every Kitchen
    regime, the TextWorld games' for textworld (whose name also starts with 'text')."""
    kitchen = envs.KitchenEnv(split="train").twin_pairs(twins.PAIRS, seed=8601)[0]["note"]
    for task in ("text", "text-mlm", "text-weak"):
        assert twins.pairs_of(task, 8601)[0]["note"] == kitchen
    textworld = gym.make("grpo_cls/TextWorld-Small-v0").unwrapped.twin_pairs(twins.PAIRS, seed=8601)
    assert [p["note"] for p in twins.pairs_of("textworld", 8601)] == [p["note"] for p in textworld]
    assert textworld[0]["note"] != kitchen


@pytest.mark.parametrize("args, report", [(["--solve"], "textworld-solve.md"), ([], "textworld.md")])
def test_the_stored_textworld_runs_regenerate_the_committed_textworld_reports_exactly(tmp_path, args, report):
    out = subprocess.run([sys.executable, "-m", "studies.textgame", *args, "--tables", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / report).read_text() == open(os.path.join(ROOT, "results", report)).read(), report


def test_the_stored_mechanism_runs_regenerate_the_committed_mechanism_report_exactly(tmp_path):
    """results/mechanism-matrix.md (the registered family, the verdict, every exploratory table) is what
    --tables computes from results/runs/mechanism/, with no training."""
    out = subprocess.run([sys.executable, "-m", "studies.mechanism", "--tables", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    committed = open(os.path.join(ROOT, "results", "mechanism-matrix.md")).read()
    assert (tmp_path / "mechanism-matrix.md").read_text() == committed


def test_the_pretraining_data_pairs_each_observation_with_the_next_one_of_its_own_trajectory():
    """arms.pretrain_trunk's 'next' objective predicts the next observation's words: the pairing must stay within
    a trajectory, and a trajectory's last step has no next one."""
    cfg = g.Config(env="text", seed=1, out="unused", threads=1, tasks_per_iter=2, num_generations=2)
    device, tok, policy, gen, rng = g.build(cfg)
    envs_ = g.make_envs(cfg, 4)
    x, x_next, has = arms.visited_observations(cfg, tok, envs_, np.random.default_rng(0), gen, device)
    assert len(x) == len(x_next) == len(has) and 0 < has.sum() < len(has)
    later = torch.nonzero(has).squeeze(1)
    assert torch.equal(x_next[later], x[later + 1])  # within a trajectory the rows are consecutive steps
    assert (x_next[~has] == 0).all()


@pytest.mark.parametrize("shown, word", [
    ({}, "cannot tell: the classifier did not separate the twins"),
    ({"H3": "lower", "H6": "lower", "H4": "lower"}, "representation"),
    ({"H3": "lower", "H5": "lower"}, "representation"),
    ({"H3": "lower", "H6": "lower"}, "information"),
    ({"H3": "lower", "H9": "lower"}, "side effects"),
    ({"H3": "lower"}, "cannot tell"),
    ({"H3": "higher", "H4": "lower"}, "cannot tell: the classifier did not separate the twins"),
    ({"H3": "lower", "H4": "higher", "H6": "lower"}, "information (shown against the prediction: H4)"),
    ({"H3": "higher"}, "cannot tell: the classifier did not separate the twins (H3), so the mechanism was not put "
                       "to the test (shown against the prediction: H3)")])
def test_the_mechanism_verdict_follows_the_protocols_rules_in_their_order(shown, word):
    fam = {h: ([], 1.0, shown.get(h)) for h in mechanism.HYPOTHESES}
    assert mechanism.verdict(fam).startswith(word)


PLANTED = {"plain": 0.0, "cls-oracle": -0.03, "placebo": -0.01, "policy": -0.02, "repel": -0.005,
           "place-high": -0.004, "place-low": 0.0}  # each arm's late flawed rate minus plain's


def planted_run(arm: str, seed: int, pairs: int = 16) -> list[dict]:
    """A made-up 60-iteration run with known effects: the cold start's pairs are the seed's, the flawed rate is
    the seed's level plus the arm's effect (at iteration 50, outside the endpoint, every arm but plain is off by
    0.5), the classifier lowers the twins' embedding cosine at iteration 60 by 0.05 (by 0.5 at iteration 58,
    which is not the end), and raises held-out success by 0.02."""
    r = np.random.default_rng(seed)
    level, grad0, pf0, pc0 = r.normal(0.3, 0.02), r.uniform(0.2, 0.9, pairs), r.uniform(0.01, 0.3, pairs), \
        r.uniform(0.01, 0.3, pairs)
    noise = np.random.default_rng([seed, len(arm)]).normal(0, 0.1, (61, pairs))
    rows = []
    for it in range(61):
        off = 0.5 * (it == 50 and arm != "plain")
        row = {"iter": it, "train_flawed_rate": None if it == 0 else level + PLANTED[arm] + off}
        if it % 2 == 0:
            row["pair_flawed_probs"] = list(pf0 * np.exp(it / 60 * grad0 * (1 + noise[it])))
            row["pair_control_probs"] = [None if i % 5 == 0 else c * np.exp(-it / 600) for i, c in enumerate(pc0)]
            row["pair_embed_cos"] = [0.88 - (arm == "cls-oracle") * (0.05 * (it == 60) + 0.5 * (it == 58))] * pairs
        if it in (0, 60):
            row["pair_grad_cos"] = list(grad0 - 0.01 * (it == 60 and arm != "plain"))
            row["ood_success_rate"] = 0.3 + 0.02 * (arm == "cls-oracle" and it == 60)
            row["ood_flawed_rate"], row["flawed_rate"] = 0.4, 0.4
        row["placed_labels"] = 32 if arm.startswith("place") and it > 0 else None
        rows.append(row)
    return rows


def test_the_mechanism_analysis_finds_planted_effects_on_36_seeds_and_names_a_missing_run():
    """On made-up runs with known effects, the registered family has the planted signs and seed counts (H7 and
    H8 on 36 seeds, the exact test counted by halves), the endpoint skips iteration 50, and the report names
    the one missing run."""
    seeds, extra = list(range(8501, 8513)), list(range(8513, 8537))
    runs = {(t, a, s): planted_run(a, s) for t, arms_ in mechanism.ARMS_OF.items() for a in arms_ for s in seeds}
    runs |= {("text", a, s): planted_run(a, s) for a in ("plain", "cls-oracle") for s in extra}
    del runs[("text-mlm", "placebo", 8503)]
    fam = mechanism.registered_family(runs, seeds, seeds + extra, 51)
    counts = {h: len(v) for h, (v, _, _) in fam.items()}
    assert counts == {"H1": 12, "H2": 12, "H3": 12, "H4": 11, "H5": 12, "H6": 11, "H7": 36, "H8": 36, "H9": 11}
    means = {h: round(float(np.mean(v)), 6) for h, (v, _, _) in fam.items() if h not in ("H1", "H2", "H8")}
    assert means == {"H3": -0.05, "H4": 0.005, "H5": -0.004, "H6": -0.02, "H7": 0.02, "H9": -0.01}
    assert fam["H7"][1] == 2 / 2 ** 36 and fam["H8"][1] == 1.0
    assert fam["H3"][2] == "lower" and fam["H4"][2] == "higher"
    text = mechanism.report(runs, seeds, extra, 51)
    assert "| text-mlm | placebo | 8501-8512 | 11 of 12 | 8503 |" in text
    assert "| text | plain | 8513-8536 | 24 of 24 | none |" in text
    assert "representation (shown against the prediction: H4)" in text


def test_the_registered_demo_checks_exactly_what_make_run_trains():
    """results/PROTOCOL.md registers make run's setting; the Makefile's run target must pass exactly it."""
    assert demo.SETTING == bench.make_run_flags()


def test_the_demo_report_counts_a_seed_as_holding_only_when_the_classifier_is_lower(tmp_path):
    """Fake stored pairs at the registered setting, one each way; a pair stored at another length and a seed
    never stored both count as missing: the tally is 1 of 4."""
    for seed, (cls, plain), iters in ((1, (0.1, 0.2), 25), (2, (0.3, 0.2), 25), (3, (0.1, 0.2), 24)):
        for arm, rate, weight in (("", cls, 0.5), ("plain", plain, 0.0)):
            folder = tmp_path / f"seed{seed}" / arm
            folder.mkdir(parents=True)
            rows = [{"iter": 0, "train_flawed_rate": None}] + [{"iter": i, "train_flawed_rate": rate}
                                                               for i in range(1, iters + 1)]
            (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            config = {"env": "grpo_cls/Kitchen-v0", "seed": seed, "cls_weight": weight, "iters": iters,
                      "tasks_per_iter": 12, "cls_labels": "oracle"}
            (folder / "config.json").write_text(json.dumps(config))
        keys = [k for _, k, _ in demo.SECONDARY]
        (tmp_path / f"seed{seed}" / "summary.json").write_text(json.dumps(
            {"iters": iters} | {k: 0.5 for k in keys} | {f"baseline_{k}": 0.4 for k in keys}))
    text = demo.report([1, 2, 3, 4], str(tmp_path))
    assert "| 1 | 0.100 | 0.200 | -0.100 |" in text and "| 2 | 0.300 | 0.200 | +0.100 |" in text
    assert "| 3 | missing" in text and "| 4 | missing" in text
    assert "lower on 1 of 4 seeds** (the rule asks for 9): the demonstration does not hold" in text
    assert "2 missing" in text


@needs_minigrid
@pytest.mark.parametrize("args, report", [(["--solve"], "minigrid-solve.md"), ([], "minigrid.md")])
def test_the_stored_minigrid_runs_regenerate_the_committed_minigrid_report_exactly(tmp_path, args, report):
    regenerate(tmp_path, "replicate", args, report)


# ---------------------------------------------------------------------------------------------
# The statistics (studies.stats)
# ---------------------------------------------------------------------------------------------

def test_compare_confidence_interval_and_steps_to_the_success_bar(tmp_path):
    m, half = stats.mean_ci([1, 2, 3, 4, 5])
    assert m == 3 and half == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5))
    success = [0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 1.0]  # iterations 1..7; the last-5 mean first reaches 0.9 at 6
    rows = [{"iter": 0, "env_steps": 0, "train_success_rate": None, "train_flawed_rate": None, "probe_flawed_prob": 0.2}]
    rows += [{"iter": i, "env_steps": 100 * i, "train_success_rate": s, "train_flawed_rate": 0.1,
              "probe_flawed_prob": 0.2 + (i == 3) * 0.4} for i, s in enumerate(success, start=1)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    got = compare.run_measures(str(tmp_path))
    assert got["steps_to_bar"] == 600 and got["probe_peak"] == pytest.approx(0.6)
    assert got["probe_area"] == pytest.approx(0.2 + 0.4 / 7)  # trapezoid: a 0.4 spike two iterations wide


def test_spearman_uses_mean_ranks_for_ties():
    assert stats.spearman(np.array([1., 2, 3, 4]), np.array([1., 3, 2, 4])) == pytest.approx(0.8)  # 1 - 6*2/60
    assert stats.spearman(np.array([1., 1, 2]), np.array([1., 2, 3])) == pytest.approx(np.sqrt(3) / 2)
    assert stats.spearman(np.array([1., np.nan, 2, 3]), np.array([3., 0, 2, 1])) == pytest.approx(-1)


def test_sign_flip_p_by_halves_equals_counting_every_sign_pattern():
    """The test counts by halves; on small inputs, real-valued and tied, it equals the plain count over all
    2^n patterns (with the same allowance for roundoff at the observed value)."""
    rng = np.random.default_rng(0)
    for n in range(1, 13):
        for v in (rng.normal(0.02, 0.05, n), rng.integers(-3, 4, n).astype(float)):
            every = stats.signed_sums(v)
            assert stats.sign_flip_p(v) == float((np.abs(every) >= abs(v.sum()) * (1 - 1e-12)).mean())


def test_sign_flip_p_is_exact_and_holm_steps_down():
    assert stats.sign_flip_p([3, 1, 2]) == 2 / 8  # only all-plus and all-minus reach |sum| = 6
    assert stats.sign_flip_p([1] * 10) == 2 / 1024 and stats.sign_flip_p([1, -1]) == 1
    assert stats.sign_flip_p([2, -1, 1]) == 6 / 8  # |sum| >= 2 in all but the two patterns summing to 0
    assert stats.sign_flip_p([1.0] * 36) == 2 / 2 ** 36 and stats.sign_flip_p([0.0] * 5) == 1  # 36 seeds: H7, H8
    # Holm at 5%: the smallest p against 0.05/2, the next against 0.05/1; stops at the first failure
    assert stats.holm({"a": 0.03, "b": 0.01}) == {"a": True, "b": True}  # Bonferroni would keep a
    assert stats.holm({"a": 0.03, "b": 0.03}) == {"a": False, "b": False}
    # 0.001 <= 0.05/4, 0.011 <= 0.05/3, 0.03 > 0.05/2: b fails, so c is kept though 0.04 <= 0.05/1
    assert stats.holm({"a": 0.001, "b": 0.03, "c": 0.04, "d": 0.011}) == {"a": True, "d": True, "b": False,
                                                                          "c": False}


# ---------------------------------------------------------------------------------------------
# Runs and their storage (studies.store): one shared cold start, finished runs, stored runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arm", [{"cls_weight": 0.5, "cls_labels": "step"}, {"cls_weight": 0.5, "cls_labels": "oracle"},
                                 {"adv": "gigpo"}, {"cls_weight": 0.5, "cls_design": "separate"}, {"beta": 0.1},
                                 {"cls_weight": 0.5, "beta": 0.1}])
def test_compare_runs_from_the_shared_cold_start_exactly_as_a_fresh_run(tmp_path, arm, monkeypatch):
    common = dict(env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, quiet=True)  # groups differ
    fresh = tiny(out=str(tmp_path / "fresh"), **common, **arm)
    arms.train(fresh)
    store.cold_start_checkpoint(tiny(out=str(tmp_path / "init"), **common))
    shared = tiny(out=str(tmp_path / "shared"), **common, **arm)
    for module in (g, arms):  # wherever the trainer finds it
        monkeypatch.setattr(module, "cold_start", lambda *a: pytest.fail("the shared run must not redo the cold start"),
                            raising=False)
    arms.train(shared, store.from_cold_start(g.load_checkpoint(str(tmp_path / "init")), shared))
    rows = rows_without_wall_time(tmp_path / "fresh")
    assert rows_without_wall_time(tmp_path / "shared") == rows and sum(r["opt_steps"] for r in rows[1:]) > 0
    assert os.path.exists(tmp_path / "shared" / "checkpoint.pt")  # its own, from the start


def test_compare_reuses_a_finished_run_only_when_every_field_that_can_change_it_matches(tmp_path):
    fields = dataclasses.asdict(store.arm_config("text", 7, {}, 3, str(tmp_path)))
    saved = fields | {"cls_labels": "step", "threads": 2, "update": g.UPDATE_VERSION}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iter": 3}))
    assert store.is_done(fields)  # a plain run has no labels to differ in; threads do not change a result
    (tmp_path / "config.json").write_text(json.dumps(saved | {"update": 1}))
    assert not store.is_done(fields)  # trained with one clip on the summed gradient: run again
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert not store.is_done(fields | {"seed": 8})
    assert not store.is_done(fields | {"cls_weight": 0.5, "cls_labels": "step"})  # the saved run is plain
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iter": 2}))
    assert not store.is_done(fields)  # stopped before its last iteration


def test_a_stored_run_unpacks_to_the_same_bytes_and_stores_reproducibly(tmp_path):
    run, stored, back = tmp_path / "run", tmp_path / "stored", tmp_path / "back"
    run.mkdir()
    for name, text in (("config.json", "{}"), ("summary.json", '{"a": 1}'), ("metrics.jsonl", '{"iter": 0}\n' * 50)):
        (run / name).write_text(text)
    store.store(str(run), str(stored), store.RUN_NAMES)
    first = (stored / "metrics.jsonl.gz").read_bytes()
    store.store(str(run), str(stored), store.RUN_NAMES)
    assert (stored / "metrics.jsonl.gz").read_bytes() == first and len(first) < 50 * 12
    assert store.is_stored(str(stored)) and not os.path.exists(str(stored) + ".tmp")
    store.unpack(str(stored), str(back))
    assert all((back / n).read_bytes() == (run / n).read_bytes() for n in ("config.json", "summary.json",
                                                                          "metrics.jsonl"))
    assert store.load_rows(str(stored)) == [{"iter": 0}] * 50


# ---------------------------------------------------------------------------------------------
# The per-pair analysis of the sampled-pair matrix (studies.twins): its measures, tests and the
# intervention (results/PROTOCOL.md)
# ---------------------------------------------------------------------------------------------

def test_withhold_leaves_out_half_the_training_goals_from_training_and_nothing_else():
    """The intervention: KitchenEnv(withhold=s) never trains on W_s, a seed-drawn half of the 55 training
    goals; the held-out split and the twin-pair sampler are untouched."""
    train_goals = {(o, r, cl) for o in envs.OBJECTS for r in envs.GOAL_RECEPTACLES for cl in (False, True)
                   if not envs.kitchen_is_heldout(o, r, cl)}
    w = envs.KitchenEnv.withheld_goals(8201)
    assert len(train_goals) == 55 and len(w) == 27 and w <= train_goals
    assert w != envs.KitchenEnv.withheld_goals(8202) and envs.KitchenEnv.withheld_goals(0) == frozenset()
    cfg = arms.ArmConfig(**store.arm_overrides("text", "withhold", 8201), env="text")
    env = g.make_envs(cfg, 1)[0].unwrapped
    drawn = {env.make_task(t)[0] for t in range(3000)}
    assert drawn == train_goals - w  # every other training goal is still drawn
    held, plain_held = envs.KitchenEnv("heldout", withhold=8201), envs.KitchenEnv("heldout")
    assert all(held.make_task(t) == plain_held.make_task(t) for t in range(50))
    assert [p["note"] for p in env.twin_pairs(8, seed=3)] == [p["note"] for p in envs.KitchenEnv().twin_pairs(8, seed=3)]
    with pytest.raises(ValueError, match="withhold"):
        envs.KitchenEnv(withhold=-1)


def pair_rows(flawed: list, control: list, grad=(0.9, 0.1), embed=(1.0, 0.5)) -> list[dict]:
    """Metric rows as pair_diagnostics logs them: one per diagnostic iteration, two pairs."""
    rows = [{"iter": 2 * t, "pair_flawed_probs": f, "pair_control_probs": cp, "flawed_rate": None}
            for t, (f, cp) in enumerate(zip(flawed, control))]
    rows[0] |= {"pair_grad_cos": list(grad), "pair_embed_cos": list(embed)}
    rows[-1]["flawed_rate"] = 0.25
    return rows


def test_pair_measures_are_the_training_mean_change_of_the_logged_log_probabilities():
    rows = pair_rows(flawed=[[0.1, 0.2], [0.2, 0.2], [0.4, 0.1]], control=[[0.1, None], [0.05, None], [0.1, None]])
    m = twins.pair_measures(rows)
    gain0 = (np.log(0.2) + np.log(0.4)) / 2 - np.log(0.1)  # pair 0: pi doubles, then quadruples
    np.testing.assert_allclose(m["gain"], [gain0, (np.log(0.2) + np.log(0.1)) / 2 - np.log(0.2)])
    np.testing.assert_allclose(m["control"][0], (np.log(0.05) + np.log(0.1)) / 2 - np.log(0.1))
    np.testing.assert_allclose(m["C1"][0], m["gain"][0] - m["control"][0])
    assert np.isnan(m["C1"][1])  # no other flawed action at its flawed twin: no control, no C1
    np.testing.assert_allclose(m["curve"][:, 0], [0, np.log(2) - np.log(0.5), np.log(4) - 0])
    assert m["grad"].tolist() == [0.9, 0.1] and m["embed"].tolist() == [1.0, 0.5] and m["flawed"] == 0.25
    floored = twins.pair_measures(pair_rows(flawed=[[0.1, 0.2], [0.0, 0.2]], control=[[0.1, None]] * 2))
    np.testing.assert_allclose(floored["gain"][0], np.log(1e-12) - np.log(0.1))  # an underflow reads as 1e-12


def test_the_intervention_contrast_is_trained_minus_withheld_good_twins_over_trained_flawed_twins():
    pairs = [{"goal_good": gg, "goal_flawed": gf, "obs_good": f"o{i}", "obs_flawed": "x", "action": 0,
              "visited": "flawed"} for i, (gg, gf) in enumerate([("A", "X"), ("B", "X"), ("W1", "X"), ("W2", "X"),
                                                                  ("W2", "X"), ("A", "W1")])]
    m = {"C1": np.array([1.0, 3.0, 0.5, 0.0, np.nan, 9.0]), "grad": np.arange(6.0), "embed": np.arange(6.0),
         "gain": np.array([0.0, 2, 1, 4, 3, 5]), "pi0": np.array([0.0, 1, 0, 1, 0, 1]), "flawed": 0.1,
         "iters": np.array([0, 2]), "curve": np.zeros((2, 6))}
    row = twins.per_seed(m, pairs, withheld={"W1", "W2"})
    # T = pairs 0, 1 (mean 2); U = pairs 2, 3 (mean 0.25; pair 4's C1 is undefined); pair 5's flawed twin is withheld
    assert row["contrast"] == pytest.approx(1.75) and (row["n_trained"], row["n_untrained"]) == (2, 2)
    assert row["n_distinct"] == 6 and twins.distinct(pairs[:4] + pairs[:1]).tolist() == [True] * 4 + [False]
    shifted = twins.per_seed(m | {"gain": m["gain"] + np.arange(6.0)}, pairs, plain=m)  # gains more with overlap
    assert shifted["rho_d"] == pytest.approx(1) and shifted["d"] == pytest.approx(2.5)


def fake_run(flawed_probs: list, control: list, grad: list) -> list[dict]:
    """Metric rows of a run whose pair probabilities are given per diagnostic iteration."""
    rows = [{"iter": 2 * t, "pair_flawed_probs": f, "pair_control_probs": cp, "flawed_rate": 0.2,
             "pair_embed_cos": [1.0] * len(f), "pair_grad_cos": grad if t == 0 else None, "wall_s": 10.0 + t}
            for t, (f, cp) in enumerate(zip(flawed_probs, control))]
    return rows


def test_seed_table_reads_every_arm_against_its_seeds_plain_run_and_reports_what_is_missing(monkeypatch):
    """Two pairs per seed; pair 1's good twin's goal is withheld. Plain GRPO: pair 1's coupled action
    doubles against a steady control (C1 = log 2), pair 0's is steady (C1 = 0), so the contrast T - U is
    -log 2. The withhold run loses pair 1's gain: contrast 0, a difference in differences of +log 2, the
    predicted sign. A missing run is listed; an arm that did not start from its plain run's cold start
    is refused."""
    pairs = [{"goal_good": "G0", "goal_flawed": "F", "obs_good": "a", "obs_flawed": "b", "action": 0},
             {"goal_good": "G1", "goal_flawed": "F", "obs_good": "c", "obs_flawed": "d", "action": 0}]
    monkeypatch.setattr(twins, "pairs_of", lambda task, seed: pairs)
    monkeypatch.setattr(twins, "ARMS_OF", {"text": ("plain", "withhold")})
    monkeypatch.setattr(envs.KitchenEnv, "withheld_goals", staticmethod(lambda s: {"G1"}))
    grad = [0.9, 0.1]
    plain = fake_run([[0.1, 0.1], [0.1, 0.2], [0.1, 0.2]], [[0.1, 0.1]] * 3, grad)
    withhold = fake_run([[0.1, 0.1]] * 3, [[0.1, 0.1]] * 3, grad)
    runs = {("text", "plain", 1): plain, ("text", "withhold", 1): withhold, ("text", "plain", 2): plain}
    stats, missing = twins.seed_table(runs, [1, 2])
    np.testing.assert_allclose(stats[("text", "plain")]["C1"], [np.log(2) / 2] * 2)
    np.testing.assert_allclose(stats[("text", "plain")]["contrast"], [-np.log(2)] * 2)  # T = pair 0, U = pair 1
    np.testing.assert_allclose(stats[("text", "withhold")]["did"], [np.log(2)])
    assert np.isnan(stats[("text", "withhold")]["rho_d"][0])  # two pairs: a rank correlation is not defined
    assert missing == [("text", "withhold", 2)] and len(stats[("text", "withhold")]["did"]) == 1
    other_start = fake_run([[0.3, 0.1], [0.2, 0.2], [0.2, 0.2]], [[0.1, 0.1]] * 3, grad)
    with pytest.raises(ValueError, match="cold start"):
        twins.seed_table(runs | {("text", "withhold", 2): other_start}, [1, 2])
    assert twins.cpu_minutes(runs) == pytest.approx((3 * 2 + 10 * 2) / 60)  # each cold start once


def test_the_pairs_the_analysis_reads_are_the_pairs_every_arm_logged():
    """twins.pairs_of(task, seed) against what grpo_cls gives a run of each arm, withhold included."""
    for task, arm in (("text", "plain"), ("text", "withhold"), ("grid", "cls-oracle")):
        cfg = arms.ArmConfig(env=task, seed=8201, out="unused", **store.arm_overrides(task, arm, 8201))
        logged = g.probes_and_pairs(cfg, g.make_envs(cfg, 1)[0])[1]
        mine = twins.pairs_of(task, 8201)
        assert len(logged) == len(mine) == store.PAIRS
        assert [p["note"] for p in logged] == [p["note"] for p in mine]


def test_family_needs_every_statistic_of_a_hypothesis_in_its_predicted_direction():
    up, down = [1.0] * 10, [-1.0] * 10
    table = {("text", "plain"): {"C1": up, "rho": up}, ("grid", "plain"): {"C1": up, "rho": down},
             ("text", "cls-oracle"): {"rho_d": down}, ("grid", "cls-oracle"): {"rho_d": up},
             ("text", "withhold"): {"did": [1.0] * 9 + [-1.0]}}
    fam = twins.family(table)
    assert fam["H1 coupling, text"] == (2 / 1024, True) and fam["H3 classifier flattens, text"][1]
    with pytest.raises(ValueError, match="nan"):
        stats.sign_flip_p([1.0, float("nan")])
    undefined = twins.family(table | {("text", "plain"): {"C1": up[:9] + [float("nan")], "rho": up}})
    assert undefined["H1 coupling, text"] == (2 / 512, True)  # the seed without a value is left out
    assert fam["H2 coupling, grid"] == (1.0, False) and fam["H4 classifier flattens, grid"] == (1.0, False)
    assert fam["H5 intervention, text"] == (22 / 1024, False)  # 0.021 > 0.05 / 3, Holm's third threshold


# ---------------------------------------------------------------------------------------------
# The paper's claims (studies.claims, studies.toys)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("r", [0.3, 0.6])
@pytest.mark.parametrize("G", [2, 4, 8])
def test_lemma_3_1_finite_group_formula_matches_monte_carlo_within_3_standard_errors(q, r, G):
    rng = np.random.default_rng(1000 * G + int(100 * q) + int(10 * r))
    est, se = toys.simulate_lemma31(q, r, G, p_safe=0.8, n_groups=100_000, scale="none", rng=rng)
    exact = toys.lemma31_expected_advantage(q, r, G)
    assert abs(est - exact) <= 3 * se, (est, exact, se)
    assert exact < 0


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_lemma_3_1_with_std_scaling_only_the_sign_survives(scale):
    """Std scaling multiplies by a positive random factor: the exact value changes, the sign does not."""
    est, se = toys.simulate_lemma31(0.5, 0.4, 8, 0.8, 50_000, scale, np.random.default_rng(3))
    assert est + 3 * se < 0


def test_lemma_3_1_fails_for_a_helpful_action():
    """The test can fail: an action that *raises* success (r < 0) gets a positive expected advantage."""
    est, se = toys.simulate_lemma31(0.5, -0.3, 8, 0.5, 50_000, "none", np.random.default_rng(4))
    assert est - 3 * se > 0 and toys.lemma31_expected_advantage(0.5, -0.3, 8) > 0


def test_squeeze_a_negative_step_on_the_harmful_action_raises_the_mildly_flawed_mode_most():
    z = claims.SQUEEZE_LOGITS
    p0, p1 = claims.probs(z), claims.probs(claims.softmax_step(z, claims.HARMFUL, -1.0, 1.0))
    gains = p1 - p0
    assert np.argmax(p0) == claims.MILD and np.argmax(gains) == claims.MILD  # the mode gains most...
    assert p1[claims.MILD] > p0[claims.MILD]                              # ...and the mode is a bad action
    z1 = claims.softmax_step(z, claims.HARMFUL, -1.0, 1.0)
    dz = z1 - z  # exactly lr * |A| * p_k for k != y
    assert np.allclose(dz[[claims.GOOD, claims.MILD]], p0[[claims.GOOD, claims.MILD]])


def test_squeeze_the_expected_step_lowers_bad_mass_and_raises_the_good_action():
    z, A = claims.SQUEEZE_LOGITS, claims.SQUEEZE_ADVANTAGES
    p0, pe = claims.probs(z), claims.probs(claims.expected_softmax_step(z, A, 1.0))
    assert pe[claims.GOOD] > p0[claims.GOOD]
    assert pe[claims.MILD] + pe[claims.HARMFUL] < p0[claims.MILD] + p0[claims.HARMFUL]
    # the expected step is the average of single steps weighted by p, each with its own advantage
    avg = sum(p0[y] * (claims.softmax_step(z, y, A[y], 1.0) - z) for y in range(3))
    assert np.allclose(claims.expected_softmax_step(z, A, 1.0) - z, avg)


@pytest.mark.parametrize("env", ["text", "grid"])
def test_one_step_on_the_good_twin_moves_the_flawed_twin_as_the_gradient_inner_product_predicts(env):
    cfg = tiny(env=env, out="unused", d_model=64)
    device, tok, policy, gen, rng = arms.build(cfg)
    probes = gym.make(cfg.env).unwrapped.twin_probes()
    for p in probes:
        actual, predicted = toys.one_step_coupling(policy, tok, p, lr=1e-4, A=1.0, device=device)
        assert abs(actual - predicted) <= 0.05 * abs(predicted) + 1e-7, (p["note"], actual, predicted)
        assert predicted != 0


def test_claims_mechanism_classification_alone_never_moves_the_policy_head_and_the_gradient_alone_never_the_classifier():
    r = claims.mechanism("text", epochs=1, d_model=32, sft_steps=50, threads=1)  # small: the checks are exact
    assert "policy_head.weight" not in r["classification alone"]["moved"]
    assert "pair_m.weight" in r["classification alone"]["moved"]  # phi, which the policy logit reads, moves
    assert not {"cls_head.weight", "cls_head.bias"} & r["policy gradient alone"]["moved"]
    assert r["classification alone"]["embed_cos"] != r["before"]["embed_cos"]


def test_the_walkthroughs_classifier_step_is_predicted_by_its_two_inner_products_and_restores_the_policy(monkeypatch):
    """explain.step_with_classifier at a small learning rate: the measured change of log pi(a | flawed twin)
    is lr * A * <g1, g2> + lr * <h, g2> to first order, and the policy is left as it was."""
    monkeypatch.setattr(explain, "LR", 1e-3)
    cfg = tiny(out="unused", cls_weight=0.5)
    device, tok, policy, gen, rng = arms.build(cfg)
    pair = gym.make(cfg.env).unwrapped.twin_pairs(3, seed=0)[0]
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    measured_plain, predicted = toys.one_step_coupling(policy, tok, pair, 1e-3, explain.A, device)
    measured, predicted_cls, _ = explain.step_with_classifier(policy, tok, pair, device)
    assert predicted_cls != 0 and abs(measured - measured_plain) > 0  # the classifier's term moved it
    assert measured == pytest.approx(predicted + predicted_cls, rel=0.05, abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


# ---------------------------------------------------------------------------------------------
# What carries the cure (studies.channels, studies.endpoints)
# ---------------------------------------------------------------------------------------------

def test_the_channel_arms_differ_from_the_classifier_only_in_the_channel(monkeypatch):
    monkeypatch.setattr(channels, "LAMBDA", {"text": 0.3, "grid": 0.2})
    cls = channels.arm_overrides("text", "cls-oracle", 8201)
    assert cls == store.arm_overrides("text", "cls-oracle", 8201)  # the sampled-pair matrix's run, reused
    assert channels.arm_overrides("text", "placebo", 8201) == cls | {"cls_channel": "placebo"}
    assert channels.arm_overrides("grid", "policy", 8201) == store.arm_overrides("grid", "cls-oracle", 8201) | {
        "cls_channel": "policy", "cls_weight": 0.2}
    monkeypatch.setattr(channels, "LAMBDA", {"text": None, "grid": None})
    with pytest.raises(SystemExit, match="calibrated"):
        channels.arm_overrides("text", "policy", 8201)
    calibration = open(os.path.join(ROOT, "results", "channels-calibration.log")).read()
    for task, weight in {"text": 0.292, "grid": 0.423}.items():  # the committed LAMBDA is the calibration's
        assert f"{task}: " in calibration and f"policy channel weight {weight}" in calibration


def test_the_channel_endpoint_and_family_read_the_late_training_flawed_rate_paired_by_seed():
    run = lambda late: [{"iter": i, "train_flawed_rate": (late if i >= 51 else 0.9)} for i in range(61)]  # noqa: E731
    assert endpoints.endpoint(run(0.25)) == 0.25  # iterations 51-60 only
    seeds = list(range(12))
    runs = {(t, a, s): run({"plain": 0.3, "cls-oracle": 0.2 - 0.001 * s, "placebo": 0.2, "policy": 0.2}[a])
            for t in ("text", "grid") for a in channels.ARMS for s in seeds}
    del runs[("grid", "policy", 0)]
    fam = endpoints.family(runs, seeds, channels.CONTRASTS)
    diffs, p, shown = fam["C1 classifier - plain, text"]
    assert np.allclose(diffs, [-0.1 - 0.001 * s for s in seeds]) and p == 2 / 4096 and shown
    assert len(fam["C6 classifier - policy, grid"][0]) == 11  # the seed without its run is left out
    assert fam["C2 classifier - placebo, text"][1] == 4 / 4096  # seed 0 ties: its sign flips either way


# ---------------------------------------------------------------------------------------------
# Each stored-run matrix trains the arms its protocol names
# ---------------------------------------------------------------------------------------------

def every_matrix_cell(module, arms_of: dict, overrides, seeds) -> dict:
    """(task, arm, seed) -> the Config a stored-run matrix trains, built as its workers build it."""
    return {(t, a, s): store.arm_config(t, s, overrides(t, a, s), 60, "unused")
            for t, arms in arms_of.items() for a in arms for s in seeds}


def test_the_repaired_label_matrix_trains_the_arms_its_protocol_names():
    cells = every_matrix_cell(repaired, repaired.ARMS_OF, repaired.arm_overrides, [8201])
    for task in ("text", "grid", "text-nomask"):
        plain, head, policy = (cells[(task, a, 8201)] for a in repaired.ARMS)
        assert plain.cls_weight == 0 and plain.twin_pairs == 128 and plain.iters == 60
        assert (head.cls_labels, head.cls_weight, head.cls_channel) == ("loop-repaired", 0.5, "head")
        assert (policy.cls_labels, policy.cls_weight, policy.cls_channel) == ("loop-repaired", repaired.LAMBDA[task],
                                                                                "policy")
        assert (head.action_mask == "none") == (task == "text-nomask")
    assert sorted(repaired.CONTRASTS.values()) == sorted((t, "cls-loop-repaired", b) for t in repaired.ARMS_OF
                                                         for b in ("plain", "policy-loop-repaired"))


@needs_minigrid
def test_the_minigrid_solve_check_and_replication_train_the_arms_their_protocol_names():
    solve = every_matrix_cell(replicate, replicate.SOLVE_OF, replicate.solve_overrides, [replicate.SOLVE_SEED])
    assert {cfg.env for cfg in solve.values()} == {f"grpo_cls/{name}" for name in envs.MINIGRID_ROOMS}
    assert all(cfg.eval_every == 10 and cfg.iters == 60 for cfg in solve.values())
    cells = every_matrix_cell(replicate, replicate.ARMS_OF, store.arm_overrides, [8301])
    assert {(t, cfg.cls_weight, cfg.cls_labels) for (t, _, _), cfg in cells.items()} == {
        (t, w, "oracle") for t in ("lavagap", "doorkey") for w in (0.0, 0.5)}
    assert all(cfg.eval_every == 60 and cfg.twin_pairs == 128 for cfg in cells.values())

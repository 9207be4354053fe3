"""Claims 3b and 4: coupling over training, and does the classifier suppress flawed actions? make compare

A matrix of GRPO runs, every cell with the same seeds, written to results/compare[-NAME].md, figures,
and a block of docs/claim4.md between markers (the tables are generated, never typed):

  stage 1, both tasks:  plain GRPO | classifier with advantage-sign, oracle and step-level labels
                        (weight 0.5) | GiGPO-style step-level advantage (--adv gigpo)
  stage 2, --stage2-tasks (text by default), for the label source with the lowest mean final flawed
  rate in stage 1:      --cls-weight 0.1 and 2 | the separate-path classifier (--cls-design separate)

Plain GRPO also runs on --coupling-seeds, for claim 3b's coupling measure (coupling_measures).
Every run of one (task, seed) starts from the same cold-started policy: it is computed once and
handed to studies.arms.train as an iteration-0 checkpoint. This gives bit for bit the run a fresh start
would (a test checks it), makes the comparison paired, and saves the cold start in every other run.
`make compare` is the short version: 20 iterations on the development seeds 1-5, about 20 minutes on 2
CPU cores as two single-thread workers. `make matrix` is the pre-registered one (results/PROTOCOL.md).
Ctrl-C keeps every finished run; the same command reuses each one whose config.json still matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

import grpo_cls as g
from studies import arms
from studies.labels import label_quality, label_table
from studies.stats import PROB_FLOOR, cell, mean_ci, verdict
from studies.store import ARMS, TASKS, arm_config, is_done, recheck, run_all, seed_list, update_doc

DEFAULT_ARMS = "plain,cls-advantage,cls-oracle,cls-step,gigpo"  # make compare and make matrix
CHANNELS = (("cls-oracle", "shape-oracle"), ("cls-loop", "shape-loop"),  # same labels, two channels
            ("cls-oracle", "shape-oracle-lambda0.2"))
SWEEP_WEIGHTS = (0.1, 2.0)  # with 0.5 from stage 1
ITERS = 20  # what fits the 20-minute budget on 2 cores: 17 min (30 iterations took 22)
SUCCESS_BAR, SMOOTH = 0.9, 5  # "steps to 0.9": first iteration whose last-5-iterations training success >= 0.9
METRICS = [  # (key, column title, digits)
    ("success", "in-domain success", 3), ("ood_success", "held-out success", 3), ("flawed", "flawed rate", 3),
    ("probe_peak", "probe pi(flawed) peak", 3), ("probe_area", "probe pi(flawed) area", 3),
    ("grad_cos", "grad_cos_twin", 2), ("embed_cos", "embed_cos_good_bad", 2), ("steps_to_bar", "env steps to 0.9", 0),
]


# ---------------------------------------------------------------------------------------------
# What each run measured
# ---------------------------------------------------------------------------------------------

def coupling_measures(rows: list[dict]) -> dict:
    """Coupling over training, against the within-run control (results/PROTOCOL.md, C1). At each twin
    probe k and diagnostic iteration t, the coupled flawed action a_k against the other flawed actions
    at the same flawed twin s2_k:  l_k(t) = log pi(a_k | s2_k) - log mean_{b flawed, b != a_k} pi(b | s2_k).
    "coupling": the mean over probes of (the mean of l_k over the diagnostics after iteration 0) - l_k(0).
    Also the same change for each side of the ratio ("coupled", "control"), and the former measure,
    the peak of pi(a|s2) over its initial value ("peak_ratio")."""
    diag = [r for r in rows if r.get("probe_control_probs") is not None]
    if len(diag) < 2 or diag[0]["iter"] != 0:
        return {"coupling": None, "coupled": None, "control": None, "peak_ratio": None}
    coupled = np.log(np.maximum([r["probe_flawed_probs"] for r in diag], PROB_FLOOR))   # (T, probes)
    control = np.log(np.maximum([r["probe_control_probs"] for r in diag], PROB_FLOOR))  # (T, probes)
    change = lambda v: float((v[1:].mean(0) - v[0]).mean())  # noqa: E731  training mean minus iteration 0
    p = np.array([r["probe_flawed_prob"] for r in diag])
    return {"coupling": change(coupled - control), "coupled": change(coupled), "control": change(control),
            "peak_ratio": float(p[1:].max() / p[0])}


def run_measures(run: str) -> dict:
    """The table's numbers for one run, read from its metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    last = lambda k: next((r[k] for r in reversed(rows) if r.get(k) is not None), None)  # noqa: E731
    probe = [(r["iter"], r["probe_flawed_prob"]) for r in rows if r["probe_flawed_prob"] is not None]
    it, p = np.array(probe).T                                   # iterations, pi(flawed | flawed twin)
    success = np.array([r["train_success_rate"] for r in rows[1:]])
    smooth = np.convolve(success, np.ones(SMOOTH) / SMOOTH, mode="valid")  # smooth[i]: iterations i+1..i+SMOOTH
    hit = np.flatnonzero(smooth >= SUCCESS_BAR)
    return coupling_measures(rows) | {
            "success": last("success_rate"), "ood_success": last("ood_success_rate"), "flawed": last("flawed_rate"),
            "probe_peak": float(p[1:].max()),  # after iteration 0, the cold start that every arm shares
            "probe_area": float(((p[1:] + p[:-1]) / 2 * np.diff(it)).sum() / (it[-1] - it[0])),  # trapezoid mean
            "grad_cos": last("grad_cos_twin"), "embed_cos": last("embed_cos_good_bad"),
            "steps_to_bar": rows[hit[0] + SMOOTH]["env_steps"] if len(hit) else None,
            "invalid": [r.get("train_invalid_rate") for r in rows[1:]],  # None where the policy is masked
            "curves": {k: [r[k] for r in rows] for k in ("train_success_rate", "train_flawed_rate")}
            | {"probe": probe}}


# ---------------------------------------------------------------------------------------------
# The comparison: tables, figures and the README block
# ---------------------------------------------------------------------------------------------

def table(results: dict, task: str, arms: list[str], seeds) -> list[str]:
    lines = ["| arm | " + " | ".join(title for _, title, _ in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for arm in arms:
        runs = [results[(task, arm, s)] for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cell([r[k] for r in runs], d, len(seeds)) for k, _, d in METRICS) + " |")
    return lines


def paired_table(results: dict, task: str, arms: list[str], seeds, base: str = "plain") -> list[str]:
    """Each arm minus the base arm on the same seed (the same cold-started policy)."""
    keys = ("success", "ood_success", "flawed", "probe_area", "grad_cos")
    lines = ["| arm | Δ in-domain success | Δ held-out success | Δ flawed rate | Δ probe pi(flawed) area | "
             "Δ grad_cos_twin |", "|---|" + "---|" * len(keys)]
    for arm in arms:
        diffs = [[results[(task, arm, s)][k] - results[(task, base, s)][k] for s in seeds] for k in keys]
        lines.append(f"| {arm} | " + " | ".join(cell(d, 3, len(seeds)) for d in diffs) + " |")
    return lines


def coupling_table(results: dict, tasks, seeds) -> list[str]:
    """Claim 3b over the plain-GRPO runs: the coupled flawed action against the control, per task."""
    lines = ["| task | seeds | Δ log-ratio coupled/control (C1) | seeds > 0 | verdict | Δ log pi(coupled) | "
             "Δ log pi(control) | peak/initial >= 1.5x (former measure) |", "|---|" + "---|" * 7]
    for t in tasks:
        runs = [results[(t, "plain", s)] for s in seeds if (t, "plain", s) in results]
        runs = [r for r in runs if r["coupling"] is not None]  # a run without probe diagnostics has no C1
        c = [r["coupling"] for r in runs]
        lines.append(f"| {t} | {len(runs)} | {cell(c, 3, len(runs))} | {sum(v > 0 for v in c)}/{len(runs)} | "
                     f"{verdict(c) if len(c) > 1 else 'n/a'} | {cell([r['coupled'] for r in runs], 3, len(runs))} | "
                     f"{cell([r['control'] for r in runs], 3, len(runs))} | "
                     f"{sum(r['peak_ratio'] >= 1.5 for r in runs)}/{len(runs)} |")
    return lines


def verdict_table(results: dict, task: str, arms: list[str], seeds, base: str = "plain") -> list[str]:
    """The pre-registered verdicts of claim 4 (results/PROTOCOL.md, V1-V3), arm minus base, same seed."""
    rules = (("flawed", "final flawed rate", True), ("success", "in-domain success", False),
             ("ood_success", "held-out success", False))
    lines = ["| arm | " + " | ".join(name for _, name, _ in rules) + " |", "|---|" + "---|" * len(rules)]
    for arm in arms:
        diffs = [[results[(task, arm, s)][k] - results[(task, base, s)][k] for s in seeds] for k, _, _ in rules]
        lines.append(f"| {arm} | " + " | ".join(f"{cell(d, 3, len(seeds))}: {verdict(d, low)}"
                                                for d, (_, _, low) in zip(diffs, rules)) + " |")
    return lines


def channel_table(results: dict, task: str, seeds) -> list[str]:
    """Same labels, two channels: the classifier arm minus the shaping arm with the same labels, same seed
    (results/PROTOCOL.md, the decisive matrix, V-5b)."""
    lines = ["| classifier - shaping | Δ final flawed rate | Δ in-domain success | Δ held-out success |",
             "|---|---|---|---|"]
    for cls_arm, shape_arm in CHANNELS:
        if (task, cls_arm, seeds[0]) not in results or (task, shape_arm, seeds[0]) not in results:
            continue
        d = {k: [results[(task, cls_arm, s)][k] - results[(task, shape_arm, s)][k] for s in seeds]
             for k in ("flawed", "success", "ood_success")}
        lines.append(f"| {cls_arm} - {shape_arm} | {cell(d['flawed'], 3, len(seeds))}: {verdict(d['flawed'], True)} | "
                     f"{cell(d['success'], 3, len(seeds))} | {cell(d['ood_success'], 3, len(seeds))} |")
    return lines


def invalid_table(results: dict, task: str, arms: list[str], seeds) -> list[str]:
    """How often each arm takes a command the env would have masked: mean over seeds of the training
    batches' share of inadmissible commands, over the first and the last 10 iterations."""
    lines = ["| arm | inadmissible share, iterations 1-10 | last 10 iterations |", "|---|---|---|"]
    for arm in arms:
        runs = [results[(task, arm, s)]["invalid"] for s in seeds]
        lines.append(f"| {arm} | {cell([np.mean(r[:10]) for r in runs], 3, len(seeds))} | "
                     f"{cell([np.mean(r[-10:]) for r in runs], 3, len(seeds))} |")
    return lines


def default_label_rule(results: dict, seeds) -> list[str]:
    """results/PROTOCOL.md, the decisive matrix, rule D: the agent-available label source that lowers the final
    flawed rate against plain GRPO on Kitchen and LavaGrid and beats its shaping control on both. The
    advantage sign is the outcome reward's own sign, so its shaping control is plain GRPO itself."""
    lines, chosen = [], []
    for source, control in (("advantage", "plain"), ("loop", "shape-loop")):
        arm = f"cls-{source}"
        if any((t, a, seeds[0]) not in results for t in ("text", "grid") for a in (arm, control, "plain")):
            continue
        ok = []
        for t in ("text", "grid"):
            for base in dict.fromkeys(("plain", control)):
                d = [results[(t, arm, s)]["flawed"] - results[(t, base, s)]["flawed"] for s in seeds]
                ok.append(verdict(d, True).startswith("lower"))
        lines.append(f"- `{source}`: {'qualifies' if all(ok) else 'does not qualify'} "
                     f"({sum(ok)} of {len(ok)} intervals below 0)")
        chosen += [source] if all(ok) else []
    if lines:
        lines.append(f"- **Default `--cls-labels`: {chosen[0] if chosen else 'oracle'}**"
                     + ("" if chosen else " (no agent-available source qualifies)"))
    return lines


def plot_curves(results: dict, tasks, arms, seeds, path: str, title: str):
    """Mean over seeds, with a band from the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("train_success_rate", "training success"), ("train_flawed_rate", "training flawed-action rate"),
              ("probe", "pi(flawed action | flawed twin)")]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for ax, (key, name) in zip(row, panels):
            for arm in arms:
                curves = [results[(task, arm, s)]["curves"][key] for s in seeds]
                if key == "probe":
                    x, y = np.array([c[0] for c in curves[0]]), np.array([[v for _, v in c] for c in curves])
                else:
                    y = np.array([c[1:] for c in curves], dtype=float)
                    x = np.arange(1, y.shape[1] + 1)
                line, = ax.plot(x, y.mean(0), label=arm)
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.12)
            ax.set_title(f"{task}: {name}", fontsize=9)
            ax.set_xlabel("iteration")
        row[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pair_embeddings(cfg, state: dict, n_tasks: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """phi(s, a) of the actions a noisy scripted agent (half its actions random) takes on fixed tasks,
    and the oracle's flawed flags: (N, d) and (N,). The same pairs for every policy (fixed seeds)."""
    device, tok, policy, gen, _ = arms.build(cfg)
    policy.load_state_dict(state)
    envs_, rng = g.make_envs(cfg, n_tasks), np.random.default_rng(0)

    def noisy(env, mask):
        return int(rng.choice(np.flatnonzero(mask))) if rng.random() < 0.5 else env.unwrapped.optimal_action()
    b = g.rollout(policy, envs_, tok, np.arange(n_tasks), np.arange(n_tasks), gen, device, pick=noisy)
    with torch.no_grad():
        _, phi, _ = policy(torch.as_tensor(b["tokens"], device=device), torch.as_tensor(b["mask"], device=device).bool())
    return phi[np.arange(len(b["action"])), b["action"]].cpu().numpy(), b["flawed"]


def plot_coupling(results: dict, tasks, seeds, path: str):
    """Claim 3b per seed: the coupled flawed action's change against the control's, one dot a seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        runs = [results[(t, "plain", s)] for s in seeds if (t, "plain", s) in results]
        x, y = [r["control"] for r in runs], [r["coupled"] for r in runs]
        ax.scatter(x, y, s=18)
        lim = max(map(abs, x + y)) * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("Δ log pi(other flawed actions | flawed twin)", fontsize=8)
        ax.set_ylabel("Δ log pi(coupled flawed action | flawed twin)", fontsize=8)
        ax.set_title(f"{t}: plain GRPO, one dot a seed\nabove the diagonal = coupled action gains on control",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_headline(results: dict, tasks, plain_seeds, seeds, path: str, arms: list[str]):
    """The README's figure, one row a task. Left, coupling: each plain-GRPO seed's change of the coupled
    flawed action against its control (claim 3b). Right, the cure: each arm's final flawed rate minus
    plain GRPO's on the same seed, one dot a seed, with the mean and its 95% interval (claim 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [a for a in arms if a != "plain"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for (left, right), t in zip(axes, tasks):
        runs = [results[(t, "plain", s)] for s in plain_seeds if (t, "plain", s) in results]
        c = [r["coupling"] for r in runs]
        left.scatter(c, np.arange(len(c)), s=16, color="tab:purple")
        m, h = mean_ci(c)
        left.errorbar([m], [-1], xerr=[h], fmt="o", color="black", capsize=4)
        left.axvline(0, color="grey", lw=0.8)
        left.set_yticks([])
        left.set_xlabel("Δ log pi(coupled flawed) - log pi(other flawed), training mean", fontsize=8)
        left.set_title(f"{t}: coupling in plain GRPO ({len(c)} seeds; black: mean, 95% CI)", fontsize=9)
        for y, arm in enumerate(arms):
            d = [results[(t, arm, s)]["flawed"] - results[(t, "plain", s)]["flawed"] for s in seeds]
            right.scatter(d, [y] * len(d), s=14, alpha=0.6)
            m, h = mean_ci(d)
            right.errorbar([m], [y + 0.25], xerr=[h], fmt="o", color="black", capsize=4)
        right.axvline(0, color="grey", lw=0.8)
        right.set_yticks(range(len(arms)), arms, fontsize=8)
        right.set_xlabel("final flawed rate, arm minus plain GRPO (same seed)", fontsize=8)
        right.set_title(f"{t}: the cure ({len(seeds)} paired seeds; left of 0 = fewer flawed actions)",
                        fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embeddings(panels: list, path: str):
    """PCA (2 components, fitted per panel) of phi of good and flawed pairs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({p[0] for p in panels}, reverse=True)
    cols = max(sum(p[0] == t for p in panels) for t in tasks)
    fig, axes = plt.subplots(len(tasks), cols, figsize=(4 * cols, 3.6 * len(tasks)), squeeze=False)
    for task, row in zip(tasks, axes):
        for ax, (_, name, phi, flawed) in zip(row, [p for p in panels if p[0] == task]):
            z = phi - phi.mean(0)
            xy = z @ np.linalg.svd(z, full_matrices=False)[2][:2].T  # (N, 2)
            for bad, colour in ((False, "tab:blue"), (True, "tab:red")):
                ax.scatter(*xy[flawed == bad].T, s=5, alpha=0.5, c=colour, label="flawed" if bad else "good")
            good_c, bad_c = phi[~flawed].mean(0), phi[flawed].mean(0)
            cos = good_c @ bad_c / np.linalg.norm(good_c) / np.linalg.norm(bad_c)
            ax.set_title(f"{task}: {name}\ncos(mean good, mean flawed) = {cos:.2f}", fontsize=9)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.compare",
                                description="Claim 4: the classifier arms against plain GRPO and GiGPO (make compare)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iters", type=int, default=ITERS, help="GRPO iterations per run (the default run has 100)")
    p.add_argument("--seeds", default="1-5", help="seeds of every cell, as '1-5' or '9101-9108,9120'; "
                   "1-5 are the development seeds, verdicts come from fresh ones (results/PROTOCOL.md)")
    p.add_argument("--coupling-seeds", default="", help="more seeds that run plain GRPO only, for claim 3b")
    p.add_argument("--tasks", default="text,grid", help="tasks of stage 1, from text, grid, text-nomask")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"arms of stage 1, 'plain' first, from {', '.join(ARMS)}")
    p.add_argument("--stage2-tasks", default="text", help="tasks of the weight sweep and the design ablation")
    p.add_argument("--no-stage2", action="store_true", help="run stage 1 only (a later call adds stage 2, reusing it)")
    p.add_argument("--workers", type=int, default=2, help="single-thread worker processes (2 cores: 2)")
    p.add_argument("--name", default="", help="names this matrix: runs/compare-NAME, results/compare-NAME.md "
                   "(default: none at 20 iterations, itersN otherwise)")
    p.add_argument("--runs", default="", help="folder of the run folders (default runs/compare-NAME); two "
                   "matrices given the same folder share the runs whose config matches")
    p.add_argument("--out", default="results", help="folder for compare.md and the figures")
    p.add_argument("--doc-block", default="", help="markers in docs/claim4.md to write the report between "
                   "(default: the --name, or 'compare' for the default matrix)")
    p.add_argument("--doc-file", default="docs/claim4.md", help="the doc whose --doc-block markers get the report")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite any block of a doc")
    p.add_argument("--recheck", nargs=2, metavar=("RUN", "INIT"), help="only train the stored run folder RUN "
                   "again from the cold start in INIT, and say whether every metric matches (before reusing it)")
    args = p.parse_args(argv)
    if args.recheck:
        return args
    args.arms = args.arms.split(",")
    tasks = [t for t in TASKS if TASKS[t]["env"] in ("text", "grid")]  # the tasks with twin probes
    if args.arms[0] != "plain" or not set(args.arms) <= set(ARMS) or not set(args.tasks.split(",")) <= set(tasks):
        p.error(f"--arms must start with plain and come from {', '.join(ARMS)}; --tasks from {', '.join(tasks)} "
                f"(the MiniGrid rooms have no twin probes: studies.replicate)")
    if not set(args.stage2_tasks.split(",")) <= set(args.tasks.split(",")):
        p.error("every --stage2-tasks entry must also be in --tasks (stage 2 picks its labels from stage 1)")
    try:
        args.seeds = seed_list(args.seeds)
        args.coupling_seeds = seed_list(args.coupling_seeds) if args.coupling_seeds else []
    except ValueError:
        p.error("--seeds and --coupling-seeds take lists like '1-5' or '9101-9108,9120'")
    if args.iters < 1 or len(args.seeds) < 2 or args.workers < 1:
        p.error("--iters and --workers must be >= 1 and --seeds needs two seeds (a confidence interval needs two)")
    args.name = args.name or ("" if args.iters == ITERS else f"iters{args.iters}")
    args.doc_block = args.doc_block or args.name or "compare"
    args.suffix = f"-{args.name}" if args.name else ""  # other matrices never overwrite the default's files
    args.runs = args.runs or "runs/compare" + args.suffix
    args.plain_seeds = args.seeds + [s for s in args.coupling_seeds if s not in args.seeds]
    args.command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))  # for the report
    return args


def init_dir(runs: str, task: str, seed: int) -> str:
    return os.path.join(runs, "init", f"{task}-seed{seed}")


def run_dir(runs: str, task: str, arm: str, seed: int) -> str:
    return os.path.join(runs, f"{task}-{arm}-seed{seed}")


def run_stage(args, cells: list[tuple], desc: str) -> tuple[dict, int]:
    """Train what is missing of cells (task, arm name, overrides, seed), in this order, from one shared cold
    start per (task, seed). Returns each cell's measures and how many finished runs were reused."""
    fields = dict.fromkeys((t, s) for t, _, _, s in cells)
    inits = [("init", dataclasses.asdict(arm_config(t, s, {}, args.iters, init_dir(args.runs, t, s)))) for t, s in fields]
    arms = [("arm", dataclasses.asdict(arm_config(t, s, over, args.iters, run_dir(args.runs, t, arm, s))),
             init_dir(args.runs, t, s)) for t, arm, over, s in cells]
    todo = [j for j in inits if not is_done(j[1], "checkpoint.pt")]
    run_all(todo, args.workers, "cold starts")
    redone = {j[1]["out"] for j in todo}
    todo_arms = [j for j in arms if j[2] in redone or not is_done(j[1])]  # a new cold start redoes its arms
    run_all(todo_arms, args.workers, desc)
    results = {(t, arm, s): run_measures(run_dir(args.runs, t, arm, s)) for t, arm, _, s in cells}
    return results, len(arms) - len(todo_arms)


def stage2_arms(best: str | None) -> dict:
    """Stage 2's arms around stage 1's best label source: the weight sweep and the separate design."""
    arms = {f"{best}-w{w:g}": ARMS.get(best, {}) | {"cls_weight": w} for w in SWEEP_WEIGHTS}
    return arms | {f"{best}-separate": ARMS.get(best, {}) | {"cls_design": "separate"}}


def run_matrix(args) -> tuple[dict, int, str | None]:
    """Stage 1: plain GRPO on every seed first (claim 3b needs only those), then each seed's other arms.
    Stage 2 (unless --no-stage2) on the classifier arm with the lowest mean final flawed rate.
    Returns the measures of every run, the number reused, and that arm."""
    tasks, seeds = args.tasks.split(","), args.seeds
    cells = [(t, "plain", {}, s) for t in tasks for s in args.plain_seeds]
    cells += [(t, arm, ARMS[arm], s) for s in seeds for t in tasks for arm in args.arms[1:]]
    results, reused = run_stage(args, cells, "stage 1")
    labels = [a for a in args.arms if a.startswith("cls-")]
    best = min(labels, key=lambda a: np.mean([results[(t, a, s)]["flawed"] for t in tasks for s in seeds]),
               default=None)
    if not args.no_stage2:
        if best is None:
            sys.exit("compare.py: stage 2 needs a classifier arm in stage 1; add one to --arms or pass --no-stage2")
        more, reused2 = run_stage(args, [(t, arm, over, s) for s in seeds for t in args.stage2_tasks.split(",")
                                         for arm, over in stage2_arms(best).items()], "stage 2")
        results, reused = results | more, reused + reused2
    return results, reused, best


def model_of(run: str) -> dict:
    return g.load_checkpoint(run)["model"]


def write_figures(args, results: dict, best: str | None):
    """The matrix's figures, into --out: curves, the sweep, coupling, the headline, the embeddings."""
    tasks, seeds, suffix = args.tasks.split(","), args.seeds, args.suffix
    os.makedirs(args.out, exist_ok=True)
    plot_curves(results, tasks, args.arms, seeds, os.path.join(args.out, f"compare_curves{suffix}.png"),
                f"stage 1: mean of {len(seeds)} seeds, band = lowest to highest seed")
    if not args.no_stage2:
        plot_curves(results, args.stage2_tasks.split(","), ["plain", best] + list(stage2_arms(best)), seeds,
                    os.path.join(args.out, f"compare_sweep{suffix}.png"),
                    f"stage 2 ({best}): weight 0.1 / 0.5 / 2 and the separate-path design")
    plot_coupling(results, tasks, args.plain_seeds, os.path.join(args.out, f"coupling{suffix}.png"))
    plot_headline(results, tasks, args.plain_seeds, seeds, os.path.join(args.out, f"headline{suffix}.png"), args.arms)
    panels, s1 = [], seeds[0]  # the first seed: the shared cold start, then plain GRPO and the best classifier
    for t in tasks:
        plain = arm_config(t, s1, {}, args.iters, "unused")
        panels.append((t, "cold start (every arm)", *pair_embeddings(plain, model_of(init_dir(args.runs, t, s1)))))
        panels.append((t, "plain GRPO, after", *pair_embeddings(plain, model_of(run_dir(args.runs, t, "plain", s1)))))
        if best is not None:
            cfg = arm_config(t, s1, ARMS[best], args.iters, "unused")
            panels.append((t, f"{best}, after", *pair_embeddings(cfg, model_of(run_dir(args.runs, t, best, s1)))))
    plot_embeddings(panels, os.path.join(args.out, f"embedding_scatter{suffix}.png"))


RULES = ("Verdicts follow the rules of results/PROTOCOL.md: an effect is a paired 95% interval that excludes 0. "
         f"Steps to 0.9: the first iteration whose last {SMOOTH} iterations' training success averages >= "
         f"{SUCCESS_BAR} (k/n: seeds that got there). Probe area: pi(flawed | flawed twin) averaged over "
         f"training (trapezoid). ")


def task_tables(results: dict, t: str, arms: list[str], seeds) -> list[str]:
    """One task's stage-1 tables: the arms, each minus plain, the verdicts, the channels, the masked commands."""
    lines = ["", f"### {t}: stage 1", ""] + table(results, t, arms, seeds)
    lines += ["", f"{t}, each arm minus plain GRPO on the same seed:", ""] + paired_table(results, t, arms[1:], seeds)
    lines += ["", f"{t}, verdicts (arm minus plain GRPO, same seed):", ""] + verdict_table(results, t, arms[1:], seeds)
    channels = channel_table(results, t, seeds)
    if len(channels) > 2:
        lines += ["", f"{t}, same labels, two channels (classifier arm minus shaping arm, same seed):", ""] + channels
    if TASKS[t].get("action_mask") == "none":
        lines += ["", f"{t}, commands the env would have masked (training batches):", ""]
        lines += invalid_table(results, t, arms, seeds)
    return lines


def report(args, results: dict, best: str | None, took: str) -> str:
    """The matrix's tables as markdown: claim 3b's coupling, each task's arms, verdicts, channels, rule D,
    label quality and stage 2."""
    tasks, seeds, arms = args.tasks.split(","), args.seeds, args.arms
    seed_text = ",".join(map(str, seeds))
    lines = [f"Generated by `python -m studies.compare {args.command}`: {args.iters}-iteration runs, seeds {seed_text}, default "
             f"config otherwise; every cell is the mean ± the half-width of a 95% Student-t interval over seeds. "
             + RULES + ("" if args.no_stage2 else f"Stage 2 uses {best}, the label source with the lowest mean final "
                        f"flawed rate in stage 1, pooled over the tasks. ") + took]
    lines += ["", "### Claim 3b: coupling over training, against the within-run control", "",
              f"Plain GRPO, seeds {','.join(map(str, args.plain_seeds))}. Δ log-ratio: the training mean of log "
              f"pi(coupled flawed action | flawed twin) - log mean pi(other flawed actions | flawed twin), minus its "
              f"value after the cold start, averaged over the probes (compare.coupling_measures).", ""]
    lines += coupling_table(results, tasks, args.plain_seeds)
    for t in tasks:
        lines += task_tables(results, t, arms, seeds)
    rule = default_label_rule(results, seeds)
    if rule:
        lines += ["", "### The default label source (results/PROTOCOL.md, the decisive matrix, rule D)", ""] + rule
    quality = {(t, s): label_quality(t, s, init_dir(args.runs, t, s)) for t in tasks for s in seeds}
    lines += ["", "### Label quality", "", "On a training-sized batch played by each seed's cold-started policy (labels "
              "change as training goes on):", ""] + label_table(quality, tasks, seeds)
    for t in args.stage2_tasks.split(",") if not args.no_stage2 else []:
        sweep = [best] + list(stage2_arms(best))
        lines += ["", f"### {t}: stage 2, {best}", ""] + table(results, t, ["plain"] + sweep, seeds)
        lines += ["", f"{t}, each minus plain GRPO on the same seed:", ""] + paired_table(results, t, sweep, seeds)
        lines += ["", f"{t}, the separate design minus the shared one ({best}, weight 0.5), same seed:", ""]
        lines += paired_table(results, t, [f"{best}-separate"], seeds, base=best)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.recheck:
        sys.exit(recheck(*args.recheck))
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it: two 2-thread processes on 2 cores collapse
    t0 = time.time()
    try:
        results, reused, best = run_matrix(args)
    except KeyboardInterrupt:
        sys.exit(f"compare.py: interrupted; {args.runs} keeps every finished run, and the same command skips them")
    write_figures(args, results, best)
    minutes, n_runs = (time.time() - t0) / 60, len(results)
    took = (f"This invocation took {minutes:.1f} min, reusing {reused} of {n_runs} finished runs from an earlier "
            f"one." if reused else f"This run took {minutes:.1f} min, all {n_runs} runs included.")
    block = report(args, results, best, took)
    with open(os.path.join(args.out, f"compare{args.suffix}.md"), "w") as f:
        f.write("# Claims 3b and 4: coupling over training, and the classifier arms\n\n" + block + "\n")
    if not args.no_doc:
        update_doc(block, marker=args.doc_block, path=args.doc_file)
    print(block)


if __name__ == "__main__":
    main()

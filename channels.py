"""What carries the cure: the classifier against a shuffled-label placebo and the labels through the policy.
make channels   (results/PROTOCOL.md, "the channel matrix")

An auxiliary loss on good/bad labels can lower the flawed rate in three ways: through the representation
(the paper's claim: the classifier pulls good and bad actions apart), through the information in its
labels, or through optimizer side effects of a second gradient stream. Four arms, each from the seed's
shared cold start, on the same labelled steps (grpo_cls.grpo_update's side stream):

  plain       GRPO
  cls-oracle  the classifier head on phi, oracle labels, weight 0.5 (GCD)
  placebo     the same head on the same steps, labels permuted within each batch (--cls-channel placebo)
  policy      the same labelled steps as a +1 / -1 advantage on log pi, no head (--cls-channel policy),
              weighted by the protocol's calibration (python channels.py --calibrate)

plain and cls-oracle are the sampled-pair matrix's runs (coupling.py), reused from results/runs/coupling/
where stored. `python channels.py --tables` regenerates results/channels.md from the stored runs.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import compare as c
import coupling as cp

SEEDS = "8201-8212"
LAMBDA = {"text": 0.292, "grid": 0.423}  # the policy channel's weight per task, from --calibrate (PROTOCOL)
ARMS = ("plain", "cls-oracle", "placebo", "policy")
ARMS_OF = {"text": ARMS, "grid": ARMS}
ENDPOINT_FROM = 51  # the endpoint: the training batches' flawed rate, mean over iterations 51..60
CONTRASTS = {  # name -> (task, arm, base): arm minus base on the same seed
    "C1 classifier - plain, text": ("text", "cls-oracle", "plain"),
    "C2 classifier - placebo, text": ("text", "cls-oracle", "placebo"),
    "C3 classifier - policy, text": ("text", "cls-oracle", "policy"),
    "C4 classifier - plain, grid": ("grid", "cls-oracle", "plain"),
    "C5 classifier - placebo, grid": ("grid", "cls-oracle", "placebo"),
    "C6 classifier - policy, grid": ("grid", "cls-oracle", "policy"),
}


def arm_overrides(task: str, arm: str, seed: int) -> dict:
    """The arm's Config fields; plain and cls-oracle are exactly the sampled-pair matrix's."""
    if arm in ("plain", "cls-oracle"):
        return cp.arm_overrides(task, arm, seed)
    over = cp.arm_overrides(task, "cls-oracle", seed)
    if arm == "placebo":
        return over | {"cls_channel": "placebo"}
    if LAMBDA[task] is None:
        sys.exit("channels.py: the policy channel's weight is not calibrated yet; run --calibrate and fix it "
                 "in results/PROTOCOL.md and LAMBDA")
    return over | {"cls_channel": "policy", "cls_weight": LAMBDA[task]}


def endpoint(rows: list[dict]) -> float:
    """The training batches' flawed rate, mean over iterations ENDPOINT_FROM.. (128 episodes each)."""
    return float(np.mean([r["train_flawed_rate"] for r in rows if r["iter"] >= ENDPOINT_FROM]))


def last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def run_numbers(rows: list[dict]) -> dict:
    """One run's endpoint and what the report sets beside it."""
    late = [r for r in rows if r["iter"] >= ENDPOINT_FROM]

    def mean(k):  # over the late iterations that logged k
        v = [r[k] for r in late if r.get(k) is not None]
        return float(np.mean(v)) if v else None
    return {"endpoint": endpoint(rows), "flawed": last(rows, "flawed_rate"), "success": last(rows, "success_rate"),
            "ood_success": last(rows, "ood_success_rate"), "cos_v_w": last(rows, "cos_v_w"),
            "pg_grad_norm": mean("pg_grad_norm"), "cls_grad_norm": mean("cls_grad_norm"),
            "cls_pg_grad_ratio": mean("cls_pg_grad_ratio"), "cls_oracle_acc": mean("cls_oracle_acc")}


def paired(runs: dict, task: str, arm: str, base: str, seeds, key: str = "endpoint") -> list[float]:
    """arm minus base on each seed where both ran."""
    return [run_numbers(runs[(task, arm, s)])[key] - run_numbers(runs[(task, base, s)])[key] for s in seeds
            if (task, arm, s) in runs and (task, base, s) in runs]


def family(runs: dict, seeds, contrasts: dict = CONTRASTS) -> dict:
    """Each contrast: (its per-seed differences, the sign-flip p, rejected by Holm at 5% over the family).
    A rejected contrast reads "the classifier lower" or "higher" by the sign of its mean."""
    diffs = {name: paired(runs, *spec, seeds) for name, spec in contrasts.items()}
    p = {name: cp.sign_flip_p(d) if len(d) >= 2 else 1.0 for name, d in diffs.items()}
    rejected = cp.holm(p)
    return {name: (diffs[name], p[name], rejected[name]) for name in contrasts}


def calibrate(args, labels: str = "oracle", tasks=tuple(ARMS_OF)) -> dict:
    """The policy channel's weight per task: the median over development seeds 1-5 of the ratio of the two
    side streams' gradient norms on the shared parameters at iteration 1 (cls_pg_grad_ratio, each over
    the same policy gradient), the classifier at 0.5 against the policy channel at 1, both on `labels`.
    Trains 1 iteration. Returns task -> weight."""
    import dataclasses
    import json
    import tempfile
    seeds = c.seed_list("1-5")
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"head": {"cls_weight": 0.5, "cls_labels": labels},
                "policy": {"cls_weight": 1.0, "cls_labels": labels, "cls_channel": "policy"}}
        jobs, cells = [], []
        for t in tasks:
            for s in seeds:
                init = os.path.join(tmp, f"init-{t}-{s}")
                jobs.append(("init", dataclasses.asdict(c.arm_config(t, s, {"twin_pairs": 0}, 1, init))))
                for name, over in arms.items():
                    out = os.path.join(tmp, f"{t}-{name}-{s}")
                    cells.append((t, name, s, out, ("arm", dataclasses.asdict(
                        c.arm_config(t, s, over | {"twin_pairs": 0, "baseline": "none"}, 1, out)), init)))
        os.environ["OMP_NUM_THREADS"] = "1"
        c.run_all(jobs, args.workers, "cold starts")
        c.run_all([x[4] for x in cells], args.workers, "1-iteration runs")
        ratio = {(t, name, s): json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[1])
                 ["cls_pg_grad_ratio"] for t, name, s, out, _ in cells}
    weights = {}
    for t in tasks:
        r = [ratio[(t, "head", s)] / ratio[(t, "policy", s)] for s in seeds]
        weights[t] = float(np.median(r))
        print(f"{t}: head/policy shared-gradient ratio per seed {', '.join(f'{x:.3f}' for x in r)}; "
              f"median {np.median(r):.3f} -> policy channel weight {np.median(r):.3g}")
    return weights


def label_quality_report(args) -> None:
    """compare.label_quality at each stored cold start: loop labels against the repaired ones."""
    import torch
    torch.set_num_threads(1)
    quality = {(t, s): c.label_quality(t, s, os.path.join(args.store, "init", f"{t}-seed{s}"))
               for t in ARMS_OF for s in args.seeds}
    text = (f"Generated by `python channels.py --label-quality`: each label source against the oracle on a "
            f"training-sized batch played by the cold-started policy of seeds {args.seeds[0]}-{args.seeds[-1]} "
            f"(the stored cold starts; no training). Mean ± 95% interval over seeds.\n\n"
            + "\n".join(c.label_table(quality, list(ARMS_OF), args.seeds)))
    with open(os.path.join(args.out, "label-quality.md"), "w") as f:
        f.write("# Label quality at the cold start: loop labels and the repaired loop labels\n\n" + text + "\n")
    print(text)


def dose_response_lines(runs: dict, task: str, arms, seeds) -> list[str]:
    """coupling.py's per-seed pair measures under each arm, against the same seed's plain run (a table)."""
    lines = ["| | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    stats = {}
    for s in seeds:
        if (task, "plain", s) not in runs:
            continue
        plain, pairs = cp.pair_measures(runs[(task, "plain", s)]), cp.pairs_of(task, s)
        for arm in arms:
            if (task, arm, s) in runs:
                m = plain if arm == "plain" else cp.pair_measures(runs[(task, arm, s)])
                if len(pairs) != len(m["C1"]) or not (np.array_equal(m["pi0"], plain["pi0"])
                                                     and np.array_equal(m["grad"], plain["grad"])):
                    raise ValueError(f"{task} {arm} seed {s}: not the plain run's cold start and pairs")
                row = cp.per_seed(m, pairs, None if arm == "plain" else plain)
                for k, v in row.items():
                    stats.setdefault(arm, {}).setdefault(k, []).append(v)
    for k, text in [("C1", "mean C1"), ("rho", "Spearman(overlap, C1)"), ("gain", "mean gain"),
                    ("d", "arm minus plain: change of the gain"), ("rho_d", "Spearman(overlap, that change)"),
                    ("d_high", "that change, high-overlap half"), ("d_low", "that change, low-overlap half")]:
        lines.append(f"| {text} | " + " | ".join(cp.stat_cell(stats.get(a, {}).get(k, []), len(seeds))
                                                 if k in stats.get(a, {}) else "" for a in arms) + " |")
    return lines


def report(runs: dict, seeds, missing: list, iters: int) -> str:
    fam = family(runs, seeds)
    lines = [f"Generated by `python channels.py --tables` from the stored runs in {cp.STORE}/ (`make channels`): "
             f"{iters}-iteration runs, seeds {seeds[0]}-{seeds[-1]}, policy channel weighted {LAMBDA}. The "
             f"endpoint is the training batches' flawed rate, mean over iterations {ENDPOINT_FROM}-{iters} "
             f"(128 episodes each). Each cell: the mean over seeds ± the half-width of its 95% Student-t "
             f"interval, then the exact two-sided sign-flip p (results/PROTOCOL.md, the channel matrix).", "",
             "### The primary family (Holm at 5% over six): the classifier minus each arm, same seed", "",
             "| contrast | mean ± 95% CI | p | verdict, Holm-corrected |", "|---|---|---|---|"]
    for name, (d, p, rejected) in fam.items():
        m, h = c.mean_ci(d) if len(d) > 1 else (float("nan"), float("nan"))
        word = ("**the classifier lower**" if m < 0 else "**the classifier higher**") if rejected else "no effect"
        lines.append(f"| {name} | {m:+.4f} ± {h:.4f} ({len(d)} seeds) | {p:.4f} | {word} |")
    if missing:
        lines += ["", "Missing runs (reported, never replaced): " + ", ".join(f"{t} {a} seed {s}"
                                                                           for t, a, s in missing)]
    keys = [("endpoint", "endpoint flawed rate"), ("flawed", "final evaluation flawed rate"),
            ("success", "final in-domain success"), ("ood_success", "final held-out success"),
            ("pg_grad_norm", "policy-gradient norm, late"), ("cls_grad_norm", "side-stream norm, late"),
            ("cls_pg_grad_ratio", "side / policy gradient on shared params, late"),
            ("cls_oracle_acc", "classifier agrees with the oracle, late"), ("cos_v_w", "cos(v, w), last")]
    for task in ARMS_OF:
        lines += ["", f"### {task} (exploratory)", "", "| | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
        for k, text in keys:
            cells = []
            for arm in ARMS:
                if k == "cos_v_w" and arm == "policy":  # its head is built but never trained
                    cells.append("")
                    continue
                v = [run_numbers(runs[(task, arm, s)])[k] for s in seeds if (task, arm, s) in runs]
                cells.append(c.cell([x for x in v if x is not None and not np.isnan(x)], 3, len(v)) if v else "")
            lines.append(f"| {text} | " + " | ".join(cells) + " |")
        lines += ["", f"{task}, the dose-response under each arm (coupling.py's measures; exploratory):", ""]
        lines += dose_response_lines(runs, task, ARMS, seeds)
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="What carries the cure: the channel matrix of results/PROTOCOL.md "
                                "(make channels)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cp.add_matrix_args(p, SEEDS, "channels.md", "docs/channels.md")
    p.add_argument("--calibrate", action="store_true", help="only measure the policy channel's weight on "
                   "development seeds 1-5 (1-iteration runs, about 4 min)")
    p.add_argument("--label-quality", action="store_true", help="only measure each label source against the "
                   "oracle at the stored cold starts of --seeds (no training; writes results/label-quality.md)")
    return cp.checked_matrix_args(p, p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    if args.calibrate:
        return calibrate(args)
    if args.label_quality:
        return label_quality_report(args)
    if not args.tables:
        cp.train_or_exit(args, ARMS_OF, arm_overrides, "channels.py")
    runs, iters = cp.load_store(args.store, ARMS_OF, args.seeds, arm_overrides)
    if iters < ENDPOINT_FROM:
        sys.exit(f"channels.py: the endpoint is the mean over iterations {ENDPOINT_FROM}-{iters}; the stored runs have "
                 f"only {iters} iterations")
    missing = [(t, a, s) for t in ARMS_OF for a in ARMS for s in args.seeds if (t, a, s) not in runs]
    block = report(runs, args.seeds, missing, iters)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "channels.md"), "w") as f:
        f.write("# What carries the cure: the classifier, a placebo, and the labels through the policy\n\n"
                + block + "\n")
    if not args.no_doc:
        c.update_doc(block.split("\n### text")[0] + "\n\nEvery table: [results/channels.md](../results/channels.md).",
                     marker="channels", path="docs/channels.md", writer="channels.py")
    print(block)


if __name__ == "__main__":
    main()

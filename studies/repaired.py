"""Loop labels an agent has, repaired: through the classifier and through the policy. make repaired
(results/PROTOCOL.md, "the repaired-label matrix")

`--cls-labels loop-repaired` labels a step bad when it makes no progress in what the agent sees (a detour
back to a situation already seen, or "nothing happens"), leaves the step that closes a loop unlabelled,
and labels the loop-erased path of a success good. No oracle. Three arms, each from the seed's shared
cold start, on three tasks (Kitchen, LavaGrid, Kitchen without the action mask):

  plain                 GRPO
  cls-loop-repaired     the classifier head on phi, repaired loop labels, weight 0.5
  policy-loop-repaired  the same labelled steps as a +1 / -1 advantage on log pi, no head (--cls-channel
                        policy), weighted by the protocol's calibration (python -m studies.repaired --calibrate)

plain on text and grid is the channel matrix's run, reused from results/runs/coupling/ after
`--recheck`. `python -m studies.repaired --tables` regenerates results/repaired.md from the stored runs.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from studies import endpoints, stats, store, twins

SEEDS = "8201-8212"
LAMBDA = {"text": 0.273, "grid": 0.386, "text-nomask": 0.324}  # the policy channel's weight, from --calibrate
ARMS = ("plain", "cls-loop-repaired", "policy-loop-repaired")
ARMS_OF = {"text": ARMS, "grid": ARMS, "text-nomask": ARMS}
CONTRASTS = {  # name -> (task, arm, base): arm minus base on the same seed; Holm over these six
    f"R{2 * i + j + 1} {label}, {task}": (task, "cls-loop-repaired", base)
    for i, task in enumerate(ARMS_OF)
    for j, (label, base) in enumerate((("classifier - plain", "plain"), ("classifier - policy", "policy-loop-repaired")))
}
RECHECK = (("text", 8201), ("grid", 8212))  # stored plain runs trained again before they are reused
LABEL_KEYS = ("cls_labelled_frac", "label_agree", "label_precision", "label_recall")


def arm_overrides(task: str, arm: str, seed: int) -> dict:
    """The arm's Config fields; plain on every task is the sampled-pair matrix's plain arm."""
    over = store.arm_overrides(task, "plain", seed)
    if arm == "plain":
        return over
    over |= {"cls_weight": 0.5, "cls_labels": "loop-repaired"}
    if arm == "cls-loop-repaired":
        return over
    if LAMBDA[task] is None:
        sys.exit("repaired.py: the policy channel's weight is not calibrated yet; run --calibrate and fix it "
                 "in results/PROTOCOL.md and LAMBDA")
    return over | {"cls_channel": "policy", "cls_weight": LAMBDA[task]}


def window_mean(rows: list[dict], key: str, first: int, last: int):
    """The mean of `key` over iterations first..last that logged it; None if none did."""
    v = [r[key] for r in rows if first <= r["iter"] <= last and r.get(key) is not None]
    return float(np.mean(v)) if v else None


def rule_d(fam: dict) -> list[str]:
    """Rule D on the repaired labels: the classifier lower than plain GRPO and than the labels through the
    policy, on Kitchen and on LavaGrid, each by its Holm-corrected verdict."""
    needed = [name for name, (task, _, _) in CONTRASTS.items() if task in ("text", "grid")]
    ok = [fam[name][2] and np.mean(fam[name][0]) < 0 for name in needed]
    verdict = "qualifies" if all(ok) else "does not qualify"
    return [f"- `loop-repaired` {verdict} ({sum(ok)} of {len(ok)} contrasts lower after Holm).",
            f"- **Default `--cls-labels`: {'loop-repaired' if all(ok) else 'oracle'}**"
            + ("" if all(ok) else " (no agent-available source qualifies; a run with oracle labels says in "
                                  "its first line that they are an upper bound a real agent lacks)")]


def family_table(fam: dict) -> list[str]:
    lines = ["| contrast | mean ± 95% CI | p | verdict, Holm over six |", "|---|---|---|---|"]
    for name, (d, p, rejected) in fam.items():
        m, h = stats.mean_ci(d) if len(d) > 1 else (float("nan"), float("nan"))
        word = ("**lower**" if m < 0 else "**higher**") if rejected else "no effect"
        lines.append(f"| {name} | {m:+.4f} ± {h:.4f} ({len(d)} seeds) | {p:.4f} | {word} |")
    return lines


def arm_table(runs: dict, task: str, seeds, iters: int, first: int = endpoints.ENDPOINT_FROM) -> list[str]:
    """Per arm: the endpoint and what the report sets beside it (exploratory)."""
    rows = [("endpoint", "endpoint flawed rate", None), ("flawed", "final evaluation flawed rate", None),
            ("success", "final in-domain success", None), ("ood_success", "final held-out success", None),
            ("pg_grad_norm", "policy-gradient norm, late", None), ("cls_grad_norm", "side-stream norm, late", None),
            ("cos_v_w", "cos(v, w), last", None)]
    rows += [(k, f"{k}, iterations {a}-{b}", (a, b)) for k in LABEL_KEYS for a, b in ((1, 10), (iters - 9, iters))]
    if task == "text-nomask":
        rows += [("train_invalid_rate", f"inadmissible share, iterations {a}-{b}", (a, b))
                 for a, b in ((1, 10), (iters - 9, iters))]
    lines = ["| | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for key, text, window in rows:
        cells = []
        for arm in ARMS:
            if (arm == "plain" and key in LABEL_KEYS + ("cls_grad_norm", "cos_v_w")) or \
                    (arm == "policy-loop-repaired" and key == "cos_v_w"):  # no side stream / an untrained head
                cells.append("")
                continue
            got = [runs[(task, arm, s)] for s in seeds if (task, arm, s) in runs]
            v = [window_mean(r, key, *window) if window else endpoints.run_numbers(r, first)[key] for r in got]
            cells.append(stats.cell([x for x in v if x is not None and not np.isnan(x)], 3, len(v)) if v else "")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines


def report(runs: dict, seeds, missing: list, iters: int, first: int = endpoints.ENDPOINT_FROM) -> str:
    fam = endpoints.family(runs, seeds, CONTRASTS, first)
    lines = [f"Generated by `python -m studies.repaired --tables` from the stored runs in {store.STORE}/ (`make repaired`): "
             f"{iters}-iteration runs, seeds {seeds[0]}-{seeds[-1]}, the policy channel weighted "
             f"{', '.join(f'{w} on {t}' for t, w in LAMBDA.items())}. The "
             f"endpoint is the training batches' flawed rate, mean over iterations {first}-{iters} "
             f"(128 episodes each). Each cell: the mean over seeds ± the half-width of its 95% Student-t "
             f"interval, then the exact two-sided sign-flip p (results/PROTOCOL.md, the repaired-label matrix).",
             "", "### The primary family (Holm at 5% over six)", ""] + family_table(fam)
    lines += ["", "### Rule D on the repaired labels", ""] + rule_d(fam)
    if missing:
        lines += ["", "Missing runs (reported, never replaced): " + ", ".join(f"{t} {a} seed {s}"
                                                                           for t, a, s in missing)]
    for task in ARMS_OF:
        lines += ["", f"### {task} (exploratory)", ""] + arm_table(runs, task, seeds, iters, first)
        lines += ["", f"{task}, paired differences on the same seed (uncorrected, exploratory):", "",
                  "| | endpoint flawed rate | final evaluation flawed rate | final in-domain success |",
                  "|---|---|---|---|"]
        for arm, base in (("cls-loop-repaired", "plain"), ("cls-loop-repaired", "policy-loop-repaired"),
                          ("policy-loop-repaired", "plain")):
            cells = [twins.stat_cell(endpoints.paired(runs, task, arm, base, seeds, key, first), len(seeds))
                     for key in ("endpoint", "flawed", "success")]
            lines.append(f"| {arm} - {base} | " + " | ".join(cells) + " |")
        lines += ["", f"{task}, the dose-response under each arm (coupling.py's measures; exploratory):", ""]
        lines += twins.dose_response_lines(runs, task, ARMS, seeds)
    return "\n".join(lines)


def recheck() -> int:
    """Train the RECHECK plain runs again from their stored cold starts with this code: 0 if every logged
    field but the clocks matches (the stored plain runs may be reused), 1 otherwise."""
    import tempfile
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for task, seed in RECHECK:
            run, init = os.path.join(tmp, f"{task}-plain"), os.path.join(tmp, f"init-{task}")
            store.unpack(os.path.join(store.STORE, f"{task}-plain-seed{seed}"), run)
            store.unpack(os.path.join(store.STORE, "init", f"{task}-seed{seed}"), init)
            bad |= store.recheck(run, init)
    print("repaired.py: the stored plain runs " + ("differ: train every plain run again" if bad else
                                                   "match: they are reused"))
    return bad


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.repaired",
                                description="Loop labels an agent has, repaired: the repaired-label matrix of "
                                "results/PROTOCOL.md (make repaired)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    store.add_matrix_args(p, SEEDS, "repaired.md", "docs/channels.md")
    endpoints.add_endpoint_arg(p)
    p.add_argument("--calibrate", action="store_true", help="only measure the policy channel's weight on "
                   "development seeds 1-5 with the repaired labels (1-iteration runs, about 5 min)")
    p.add_argument("--recheck", action="store_true", help="only train two stored plain runs again and compare "
                   "them field by field (about 3 min)")
    return store.checked_matrix_args(p, p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    if args.calibrate:
        store.calibrate(args, labels="loop-repaired", tasks=tuple(ARMS_OF))
        return
    if args.recheck:
        sys.exit(recheck())
    if not args.tables:
        store.train_or_exit(args, ARMS_OF, arm_overrides, "repaired.py")
    runs, iters = store.load_store(args.store, ARMS_OF, args.seeds, arm_overrides)
    if iters < args.endpoint_from:
        sys.exit(f"repaired.py: the endpoint is the mean over iterations {args.endpoint_from}-{iters}; the stored "
                 f"runs have only {iters} iterations")
    missing = [(t, a, s) for t in ARMS_OF for a in ARMS for s in args.seeds if (t, a, s) not in runs]
    block = report(runs, args.seeds, missing, iters, args.endpoint_from)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "repaired.md"), "w") as f:
        f.write("# Loop labels an agent has, repaired: through the classifier and through the policy\n\n"
                + block + "\n")
    if not args.no_doc:
        store.update_doc(block.split("\n### text")[0].rstrip() + "\n\nEvery table: [results/repaired.md](../results/repaired.md).",
                         marker="repaired", path="docs/channels.md", writer="repaired.py")
    print(block)


if __name__ == "__main__":
    main()

"""Bit-identical training before and after a refactor, on one machine: train short configs that cover plain
GRPO and every arm with an old checkout and with this one, and compare every logged field but clocks and
memory. Writes the comparison to results/refactor-check.log.

    git worktree add /tmp/old <old commit>
    python -m studies.refactor_check --side old --tree /tmp/old     # the old code's runs
    python -m studies.refactor_check --side new                     # this code's runs
    python -m studies.refactor_check --compare                      # field by field; exit 1 on a difference

The old side runs the old tree's `grpo_cls.py` (which held every arm). The new side runs each config through
the lab's trainer (`python -m studies.arms`), and the configs with every arm off through `grpo_cls.py` too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

COMMON = ["--iters", "4", "--tasks-per-iter", "8", "--num-generations", "4", "--eval-every", "2",
          "--diag-every", "1", "--eval-tasks", "16", "--sft-steps", "60", "--twin-pairs", "8", "--threads", "1",
          "--minibatch-size", "32", "--quiet", "--no-plots", "--baseline", "none", "--overwrite"]
CLS = ["--cls-weight", "0.5"]
CONFIGS = {  # name: (flags, every arm off, so that grpo_cls.py runs it too)
    "text-plain": ([], True),
    "grid-plain": (["--env", "grid"], True),
    "text-cls-oracle": (CLS, True),
    "grid-cls-oracle": (["--env", "grid"] + CLS, True),
    "text-cls-advantage": (CLS + ["--cls-labels", "advantage"], True),
    "text-cls-oracle-kl-epochs": (CLS + ["--beta", "0.05", "--num-iterations", "2", "--scale-rewards", "none"],
                                  True),
    "text-nomask-plain": (["--action-mask", "none"], True),
    "text-nomask-cls-oracle": (["--action-mask", "none"] + CLS, True),
    "minigrid-lavagap-plain": (["--env", "MiniGrid-LavaGapS5-v0"], True),
    "minigrid-lavagap-cls-oracle": (["--env", "MiniGrid-LavaGapS5-v0"] + CLS, True),
    "frozenlake-plain": (["--env", "FrozenLake-v1", "--sft-steps", "0"], True),
    "text-cls-step": (CLS + ["--cls-labels", "step"], False),
    "text-cls-loop": (CLS + ["--cls-labels", "loop"], False),
    "text-cls-loop-repaired": (CLS + ["--cls-labels", "loop-repaired"], False),
    "grid-cls-loop": (["--env", "grid"] + CLS + ["--cls-labels", "loop"], False),
    "text-placebo": (CLS + ["--cls-channel", "placebo"], False),
    "grid-placebo": (["--env", "grid"] + CLS + ["--cls-channel", "placebo"], False),
    "text-policy-channel": (CLS + ["--cls-channel", "policy"], False),
    "text-policy-channel-loop": (CLS + ["--cls-channel", "policy", "--cls-labels", "loop-repaired"], False),
    "text-shape-oracle": (["--shaping", "oracle", "--shaping-lambda", "0.3"], False),
    "grid-shape-loop": (["--env", "grid", "--shaping", "loop", "--shaping-lambda", "0.3"], False),
    "text-separate": (CLS + ["--cls-design", "separate"], False),
    "text-gigpo": (["--adv", "gigpo"], False),
    "grid-gigpo-cls": (["--env", "grid", "--adv", "gigpo"] + CLS, False),
    "text-nomask-cls-loop": (["--action-mask", "none"] + CLS + ["--cls-labels", "loop"], False),
    "minigrid-lavagap-placebo": (["--env", "MiniGrid-LavaGapS5-v0"] + CLS + ["--cls-channel", "placebo"], False),
}
IGNORED = ("wall_s", "rss_mib", "peak_rss_mib")  # and every time_* field: clocks and memory
LOG = "results/refactor-check.log"


def train(cmd: list[str], cwd: str, out: str):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": cwd}
    done = subprocess.run(cmd + COMMON + ["--out", out], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"refactor_check: {' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")


def run_side(side: str, tree: str, root: str):
    py = sys.executable
    for name, (flags, core) in CONFIGS.items():
        print(f"{side} {name}", flush=True)
        if side == "old":
            train([py, "grpo_cls.py"] + flags, tree, os.path.join(root, "old", name))
            continue
        train([py, "-m", "studies.arms"] + flags, tree, os.path.join(root, "lab", name))
        if core:
            train([py, "grpo_cls.py"] + flags, tree, os.path.join(root, "core", name))


def rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def differences(old: list[dict], new: list[dict], elsewhere: set) -> tuple[list[str], set]:
    """The fields that differ (iteration: field), and the fields the new rows do not log. The fields in
    `elsewhere` (the lab's own, in a grpo_cls.py run) are compared in the lab's run of the same config."""
    if len(old) != len(new):
        return [f"{len(old)} rows against {len(new)}"], set()
    bad, dropped = [], set()
    for a, b in zip(old, new):
        for k in a.keys() | b.keys():
            if k in IGNORED or k.startswith("time_"):
                continue
            if k not in b:
                dropped.add(k)
            if k not in elsewhere and a.get(k) != b.get(k):
                bad.append(f"iter {a['iter']}: {k} {a.get(k)!r} != {b.get(k)!r}")
    return bad, dropped


def compare(root: str) -> tuple[str, int]:
    import grpo_cls
    from studies import arms
    lab_only = set(arms.ROW_KEYS) - set(grpo_cls.ROW_KEYS)
    lines, failed = [], 0
    for name, (_, core) in CONFIGS.items():
        old = rows(os.path.join(root, "old", name))
        for side in ("lab", "core") if core else ("lab",):
            bad, dropped = differences(old, rows(os.path.join(root, side, name)), lab_only if side == "core" else set())
            failed += bool(bad)
            fields = len({k for r in old for k in r})
            verdict = "identical" if not bad else f"DIFFERS ({len(bad)}): " + "; ".join(bad[:3])
            note = f"; the lab's own fields are compared in its run ({', '.join(sorted(dropped))})" if dropped else ""
            lines.append(f"{name:30} {side:4} {len(old)} rows, {fields} fields: {verdict}{note}")
    text = "\n".join(lines) + f"\n{failed} of {len(lines)} comparisons differ\n"
    print(text, end="")
    return text, failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m studies.refactor_check", description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=("old", "new"), help="train one side's runs")
    parser.add_argument("--tree", default=".", help="the checkout whose code trains this side")
    parser.add_argument("--runs", default="/tmp/refactor-check", help="where both sides' runs go")
    parser.add_argument("--compare", action="store_true", help="compare the two sides; write " + LOG)
    parser.add_argument("--header", default="", help="a line for the log's head: the machine and commits")
    args = parser.parse_args(argv)
    if args.side:
        run_side(args.side, os.path.abspath(args.tree), args.runs)
    if args.compare:
        text, failed = compare(args.runs)
        with open(LOG, "w") as f:
            f.write((args.header + "\n" if args.header else "") + text)
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

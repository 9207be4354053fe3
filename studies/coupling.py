"""Claim 3b where it lives: coupling over sampled twin pairs, its dose-response, an intervention. make coupling

The paper's mechanism is a prediction about pairs of states. A flawed action gains at a state that
overlaps in representation with a state where the same action is good, and gains more the more they
overlap. This script runs the pre-registered matrix of results/PROTOCOL.md ("the sampled-pair matrix"):

  text (Kitchen):  plain GRPO | the oracle classifier (weight 0.5) | plain GRPO with half the training
                   goals withheld (--env-kwargs '{"withhold": seed}', the intervention)
  grid (LavaGrid): plain GRPO | the oracle classifier

Every run of one (task, seed) starts from one shared cold start (studies.store) and logs the same
--twin-pairs sampled pairs (grpo_cls.pair_diagnostics). Each finished run is stored, compressed, under
results/runs/coupling/ with its cold start, so the matrix resumes on another machine and
`python -m studies.coupling --tables` regenerates every table and figure from the stored runs without
training. The per-pair analysis, which the other matrices share, is studies.twins.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from studies.store import add_matrix_args, arm_overrides, checked_matrix_args, load_store, train_or_exit, update_doc
from studies.twins import ARMS_OF, cpu_minutes, pair_measures, plot_dose, report, seed_table

SEEDS = "8201-8210"  # fresh: never used before this matrix (results/PROTOCOL.md)


# ---------------------------------------------------------------------------------------------
# The growth figure (every other table and figure: studies.twins)
# ---------------------------------------------------------------------------------------------

def plot_growth(runs: dict, seeds: list[int], path: str, tasks=None):
    """C1 over iterations for the pairs above and below the median overlap, plain against classifier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks or ARMS_OF):
        for arm, style in (("plain", "-"), ("cls-oracle", "--")):
            for half, colour in (("high", "tab:red"), ("low", "tab:grey")):
                curves = []
                for s in [s for s in seeds if (task, arm, s) in runs and (task, "plain", s) in runs]:
                    m, grad = pair_measures(runs[(task, arm, s)]), pair_measures(runs[(task, "plain", s)])["grad"]
                    high = grad > np.median(grad)
                    curves.append(np.nanmean(m["curve"][:, high if half == "high" else ~high], 1))
                ax.plot(m["iters"], np.mean(curves, 0), style, color=colour,
                        label=f"{'plain' if arm == 'plain' else 'classifier'}, {half}-overlap half")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("C1 at iteration t (mean over pairs, then seeds)", fontsize=8)
        ax.set_title(f"{task}: when coupling acts", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.coupling",
                                description="Claim 3b over sampled twin pairs: the pre-registered matrix of "
                                "results/PROTOCOL.md (make coupling)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_matrix_args(p, SEEDS, "coupling.md and the figures", "docs/claims.md")
    return checked_matrix_args(p, p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    if not args.tables:
        train_or_exit(args, ARMS_OF, arm_overrides, "coupling.py")
    runs, iters = load_store(args.store, ARMS_OF, args.seeds, arm_overrides)
    stats, missing = seed_table(runs, args.seeds)
    block = report(stats, args.seeds, missing, cpu_minutes(runs), iters, args.store)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "coupling.md"), "w") as f:
        f.write("# Claim 3b over sampled twin pairs: the dose-response and the intervention\n\n" + block + "\n")
    plot_dose(runs, args.seeds, os.path.join(args.out, "dose_response.png"))
    plot_growth(runs, args.seeds, os.path.join(args.out, "coupling_growth.png"))
    if not args.no_doc:
        short = block.split("\n### text")[0] + "\n\nEvery table: [results/coupling.md](../results/coupling.md)."
        update_doc(short, marker="pairs", path="docs/claims.md", writer="coupling.py")
    print(block)


if __name__ == "__main__":
    main()

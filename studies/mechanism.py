"""Does pulling the twins apart carry the cure? The mechanism matrix (results/PROTOCOL.md, 2026-12-05).
make mechanism   (python -m studies.mechanism; about 4-5 hours on two single-thread workers; resumes)

Three accounts of how the classifier lowers the flawed rate: representation (separating the twins weakens
coupling), information (per-step labels help through any route) and side effects (a second gradient stream
helps whatever it carries). Three Kitchen regimes, each a task of studies.store.TASKS:

  text        the default trunk and cold start (the twins start at an embedding cosine of about 0.73)
  text-mlm    the trunk pretrained by masked-token prediction first (--pretrain mlm): twins start closer
              (about 0.88), as near-identical prompts do in a pretrained language model (make regime)
  text-weak   a weak cold start (--sft-steps 100): flawed actions start likely (about 0.64)

and the arms (each from the seed's shared cold start, studies.arms):

  plain        GRPO
  cls-oracle   the classifier, oracle labels on every step (GCD)
  placebo      the classifier on labels permuted within each batch
  policy       the same labels as a +1 / -1 advantage on log pi (weighted as the channel matrix's, 0.292)
  repel        no labels: the twins' pair embeddings (their parts the policy logit does not read) pushed
               apart on 256 training twin pairs
  place-high   oracle labels only at twins of high-overlap training pairs, at most 32 a batch and never
               more than the other half offers in the same batch
  place-low    the same at twins of low-overlap training pairs

`--tables` computes the registered family (H1-H9, Holm over the nine), the verdict by the protocol's rules,
the exploratory tables and the figure of each account's predictions beside what was measured, from the
stored runs alone: results/mechanism-matrix.md and results/mechanism-matrix.png (results/mechanism.md and
mechanism.png are claim 3c's, from studies.claims --mechanism).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from studies import stats, store
from studies.endpoints import add_endpoint_arg, run_numbers
from studies.twins import end_cosines, head_start, pair_measures

SEEDS = "8501-8512"
REPORT, FIGURE = "mechanism-matrix.md", "mechanism-matrix.png"  # not claim 3c's mechanism.md / .png
EXTRA_SEEDS = "8513-8536"  # plain and cls-oracle on text only: the generalization contrasts (H7, H8)
POLICY_WEIGHT = 0.292  # the policy channel's weight, the channel matrix's calibration on Kitchen
ALL = ("plain", "cls-oracle", "placebo", "policy", "repel", "place-high", "place-low")
ARMS_OF = {"text": ALL, "text-mlm": ALL, "text-weak": ("plain", "cls-oracle", "repel")}
EXTRA_ARMS_OF = {"text": ("plain", "cls-oracle")}
FLAWED_CONTRASTS = {  # the family's contrasts on the late training flawed rate: name -> (task, arm, base)
    "H4": ("text-mlm", "repel", "placebo"), "H5": ("text-mlm", "place-high", "place-low"),
    "H6": ("text-mlm", "cls-oracle", "placebo"), "H9": ("text-mlm", "placebo", "plain")}
HYPOTHESES = {  # name -> what it tests, as results/PROTOCOL.md words it
    "H1": "coupling beyond the head start, plain, text: partial rho(overlap, C1 given l0)",
    "H2": "the same, text-mlm",
    "H3": "manipulation check, text-mlm: cls-oracle - plain, twins' embedding cosine at the end",
    "H4": "representation alone, text-mlm: repel - placebo, late flawed rate",
    "H5": "label placement, text-mlm: place-high - place-low, late flawed rate",
    "H6": "information beyond side effects, text-mlm: cls-oracle - placebo, late flawed rate",
    "H7": "generalization, text: cls-oracle - plain, held-out success",
    "H8": "generalization, text: cls-oracle - plain, held-out flawed rate",
    "H9": "side effects, text-mlm: placebo - plain, late flawed rate"}


def arm_overrides(task: str, arm: str, seed: int) -> dict:
    """The arm's Config fields beyond the task's: every arm logs the sampled-pair matrix's 128 pairs."""
    over = store.arm_overrides(task, "plain", seed)
    if arm == "plain":
        return over
    if arm == "policy":
        return over | store.ARMS["cls-oracle"] | {"cls_channel": "policy", "cls_weight": POLICY_WEIGHT}
    if arm == "placebo":
        return over | store.ARMS["cls-oracle"] | {"cls_channel": "placebo"}
    return over | store.ARMS[arm]


def stored_lines(runs: dict, arms_of: dict, seeds: list[int]) -> list[str]:
    """Per cell, how many of its seeds are stored, and which are missing."""
    lines = []
    for t, names in arms_of.items():
        for a in names:
            missing = [s for s in seeds if (t, a, s) not in runs]
            lines.append(f"| {t} | {a} | {seeds[0]}-{seeds[-1]} | {len(seeds) - len(missing)} of {len(seeds)} | "
                         + (", ".join(map(str, missing)) or "none") + " |")
    return lines


def same_start(runs: dict, run: tuple, base: tuple) -> bool:
    """Both runs left the same cold start: their iteration-0 head starts over the pairs agree."""
    return bool(np.array_equal(head_start(runs[run]), head_start(runs[base]), equal_nan=True))


def end_embed(rows: list[dict]) -> float:
    """The twins' mean embedding cosine at the run's end, over the pairs."""
    return float(np.nanmean(end_cosines(rows)[0]))


def diff(runs: dict, run: tuple, base: tuple, key: str, first: int) -> float:
    """One run's number minus its base run's (run_numbers' key)."""
    return run_numbers(runs[run], first)[key] - run_numbers(runs[base], first)[key]


def per_seed(runs: dict, key: tuple, first: int) -> list[float]:
    """One hypothesis's per-seed values over the seeds where its runs are stored (nan where undefined)."""
    name, seeds = key
    if name in ("H1", "H2"):
        task = "text" if name == "H1" else "text-mlm"
        out = []
        for s in seeds:
            if (task, "plain", s) in runs:
                rows = runs[(task, "plain", s)]
                m = pair_measures(rows)
                out.append(stats.partial_spearman(m["grad"], m["C1"], head_start(rows)))
        return out
    if name == "H3":
        return [end_embed(runs[("text-mlm", "cls-oracle", s)]) - end_embed(runs[("text-mlm", "plain", s)])
                for s in seeds if ("text-mlm", "cls-oracle", s) in runs and ("text-mlm", "plain", s) in runs]
    if name in ("H7", "H8"):
        k = "ood_success" if name == "H7" else "ood_flawed"
        return [diff(runs, ("text", "cls-oracle", s), ("text", "plain", s), k, first)
                for s in seeds if ("text", "cls-oracle", s) in runs and ("text", "plain", s) in runs]
    task, arm, base = FLAWED_CONTRASTS[name]
    return [diff(runs, (task, arm, s), (task, base, s), "endpoint", first)
            for s in seeds if (task, arm, s) in runs and (task, base, s) in runs]


def registered_family(runs: dict, seeds: list[int], all_seeds: list[int], first: int) -> dict:
    """name -> (per-seed values, sign-flip p, shown: 'lower' / 'higher' / None by Holm over the nine)."""
    values = {h: stats.defined(per_seed(runs, (h, all_seeds if h in ("H7", "H8") else seeds), first))
              for h in HYPOTHESES}
    p = {h: stats.sign_flip_p(v) if len(v) >= 2 else 1.0 for h, v in values.items()}
    rejected = stats.holm(p)
    shown = {h: (("lower" if np.mean(values[h]) < 0 else "higher") if rejected[h] else None) for h in HYPOTHESES}
    return {h: (values[h], p[h], shown[h]) for h in HYPOTHESES}


def verdict(fam: dict) -> str:
    """The protocol's rules, in their order, and any hypothesis shown against an account's prediction."""
    shown = {h: fam[h][2] for h in fam}
    if shown["H3"] != "lower":
        word = "cannot tell: the classifier did not separate the twins (H3), so the mechanism was not put to the test"
    elif "lower" in (shown["H4"], shown["H5"]):
        word = "representation"
    elif shown["H6"] == "lower":
        word = "information"
    elif shown["H9"] == "lower":
        word = "side effects"
    else:
        word = "cannot tell"
    against = [h for h in ("H3", "H4", "H5", "H6", "H9") if shown[h] == "higher"]
    return word + (f" (shown against the prediction: {', '.join(against)})" if against else "")


def mediation(rows: list[dict], plain_rows: list[dict]) -> float:
    """Per pair, the arm's change of overlap at the end against plain GRPO's and its change of the gain, their
    partial Spearman correlation with l0 held fixed (the same cold start: l0 is plain's)."""
    m, mp = pair_measures(rows), pair_measures(plain_rows)
    d_overlap = end_cosines(rows)[1] - end_cosines(plain_rows)[1]
    return stats.partial_spearman(d_overlap, m["gain"] - mp["gain"], head_start(plain_rows))


def arm_minus_plain(runs: dict, task: str, arm: str, seeds: list[int], first: int) -> dict:
    """Exploratory: the arm minus plain GRPO on its task, per measure, over the seeds where both ran."""
    both = [s for s in seeds if (task, arm, s) in runs and (task, "plain", s) in runs]
    out = {}
    for k in ("endpoint", "ood_success", "ood_flawed"):
        out[k] = [run_numbers(runs[(task, arm, s)], first)[k] - run_numbers(runs[(task, "plain", s)], first)[k]
                  for s in both]
    out["embed_end"] = [end_embed(runs[(task, arm, s)]) - end_embed(runs[(task, "plain", s)]) for s in both]
    out["grad_end"] = [float(np.nanmean(end_cosines(runs[(task, arm, s)])[1]
                                        - end_cosines(runs[(task, "plain", s)])[1])) for s in both]
    out["gain"] = [float(np.nanmean(pair_measures(runs[(task, arm, s)])["gain"]
                                    - pair_measures(runs[(task, "plain", s)])["gain"])) for s in both]
    out["mediation"] = [mediation(runs[(task, arm, s)], runs[(task, "plain", s)]) for s in both]
    return out


def cell(v: list) -> str:
    v = stats.defined(v)
    if len(v) < 2:
        return "n/a"
    m, h = stats.mean_ci(v)
    p = stats.sign_flip_p(v)
    p_text = f"{p:.1e}" if p < 1e-4 else f"{p:.4f}" if p < 0.001 else f"{p:.3f}"   # 2^-11 is 0.0005, not "0.000"
    return f"{m:+.3f} ± {h:.3f} (p {p_text}, {len(v)})"


def header(seeds: list[int], extra_seeds: list[int], first: int) -> list[str]:
    extra = f"; plain and cls-oracle on text also {extra_seeds[0]}-{extra_seeds[-1]}" if extra_seeds else ""
    return ["Generated by `python -m studies.mechanism --tables` from the stored runs (results/PROTOCOL.md, the "
            f"mechanism matrix and its amendments). Seeds {seeds[0]}-{seeds[-1]}{extra}. Late flawed rate: the "
            f"training batches' flawed rate over iterations {first} onward. Each cell: mean ± 95% t half-width over "
            "seeds, the exact two-sided sign-flip p, uncorrected, and the number of seeds.", ""]


def stored_section(runs: dict, seeds: list[int], extra_seeds: list[int]) -> list[str]:
    lines = ["### Stored runs", "", "| task | arm | seeds | stored | missing |", "|---|---|---|---|---|"]
    lines += stored_lines(runs, ARMS_OF, seeds)
    lines += stored_lines(runs, EXTRA_ARMS_OF, extra_seeds) if extra_seeds else []
    apart = [f"{t} {a} {s}" for (t, a, s) in runs if a != "plain" and (t, "plain", s) in runs
             and not same_start(runs, (t, a, s), (t, "plain", s))]
    return lines + ["", "Runs whose cold start differs from plain GRPO's on the same task and seed (they should "
                    "share it): " + (", ".join(apart) or "none") + "."]


def regime_contrasts(runs: dict, task: str, seeds: list[int], first: int) -> list[str]:
    """Exploratory: the family's statistics on one regime, where its arms ran."""
    plain = [runs[(task, "plain", s)] for s in seeds if (task, "plain", s) in runs]
    measured = [pair_measures(r) for r in plain]
    rho = [stats.partial_spearman(m["grad"], m["C1"], head_start(r)) for m, r in zip(measured, plain)]
    lines = [f"| partial rho(overlap, C1 given l0), plain (H1, H2) | {cell(rho)} |",
             f"| mean C1 over pairs, plain | {cell([float(np.nanmean(m['C1'])) for m in measured])} |",
             f"| mean gain over pairs, plain | {cell([float(np.nanmean(m['gain'])) for m in measured])} |"]
    for name, (_, arm, base) in FLAWED_CONTRASTS.items():
        if arm in ARMS_OF[task] and base in ARMS_OF[task]:
            v = [diff(runs, (task, arm, s), (task, base, s), "endpoint", first)
                 for s in seeds if (task, arm, s) in runs and (task, base, s) in runs]
            lines.append(f"| {name}: {arm} - {base}, late flawed rate | {cell(v)} |")
    return ["", f"{task}, the family's statistics on this regime (exploratory, uncorrected):", "",
            "| statistic | mean ± 95% CI (p, seeds) |", "|---|---|"] + lines


def placement_lines(runs: dict, task: str, seeds: list[int], first: int) -> list[str]:
    """The labels each placement arm actually got a batch, and what each half offered, mean over seeds."""
    lines = []
    for arm in ("place-high", "place-low"):
        got = [runs[(task, arm, s)] for s in seeds if (task, arm, s) in runs]
        if not got:
            continue
        def mean(k: str, lo: int) -> float:
            return float(np.mean([np.mean([r.get(k) or 0 for r in rows if r["iter"] >= lo]) for rows in got]))
        lines.append(f"{task}, {arm}, a batch, mean over seeds (iterations 1-60 / {first}-60): labels placed "
                     f"{mean('placed_labels', 1):.1f} / {mean('placed_labels', first):.1f}; eligible steps in its "
                     f"half {mean('placement_eligible', 1):.1f} / {mean('placement_eligible', first):.1f}; in the "
                     f"other half {mean('placement_eligible_other', 1):.1f} / "
                     f"{mean('placement_eligible_other', first):.1f}.")
    return lines


def levels(runs: dict, task: str, seeds: list[int], first: int) -> list[str]:
    """Descriptive: each arm's own mean ± 95% t half-width over its seeds, no test (added after the report was
    read, to show the levels the contrasts start from)."""
    def level(arm: str, k: str) -> str:
        got = [runs[(task, arm, s)] for s in seeds if (task, arm, s) in runs]
        v = stats.defined([end_embed(r) if k == "embed_end" else run_numbers(r, first)[k] for r in got])
        if len(v) < 2:
            return "n/a"
        m, h = stats.mean_ci(v)
        return f"{m:.3f} ± {h:.3f} ({len(v)})"
    names = {"endpoint": "late flawed rate", "ood_success": "held-out success",
             "ood_flawed": "held-out flawed rate", "embed_end": "twins' embedding cosine at the end"}
    arms = ARMS_OF[task]
    lines = ["", f"{task}, each arm's own level over seeds {seeds[0]}-{seeds[-1]}, mean ± 95% t half-width (seeds), "
             "descriptive:", "",
             "| measure | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(level(a, k) for a in arms) + " |" for k, name in names.items()]


def report(runs: dict, seeds: list[int], extra_seeds: list[int], first: int) -> str:
    all_seeds = seeds + [s for s in extra_seeds if s not in seeds]
    fam = registered_family(runs, seeds, all_seeds, first)
    lines = header(seeds, extra_seeds, first) + stored_section(runs, seeds, extra_seeds)
    lines += ["", "### The primary family (Holm at 5% over nine)", "",
              "| hypothesis | mean ± 95% CI (p, seeds) | shown, Holm-corrected |", "|---|---|---|"]
    for h, (v, p, shown) in fam.items():
        lines.append(f"| {h} {HYPOTHESES[h]} | {cell(v)} | {shown or 'not shown'} |")
    lines += ["", f"**Which account the data support (text-mlm, the protocol's rules): {verdict(fam)}.**"]
    names = {"endpoint": "late flawed rate", "ood_success": "held-out success", "ood_flawed": "held-out flawed rate",
             "embed_end": "twins' embedding cosine at the end", "grad_end": "twins' gradient cosine at the end",
             "gain": "mean gain over pairs (the absolute change of log pi)",
             "mediation": "mediation: rho(d overlap, d gain given l0)"}
    for task, arms in ARMS_OF.items():
        lines += ["", f"### {task}: each arm minus plain GRPO (exploratory, uncorrected)", "",
                  "| measure | " + " | ".join(a for a in arms if a != "plain") + " |",
                  "|---" * len(arms) + "|"]
        diffs = {a: arm_minus_plain(runs, task, a, seeds, first) for a in arms if a != "plain"}
        for k, name in names.items():
            lines.append(f"| {name} | " + " | ".join(cell(diffs[a][k]) for a in diffs) + " |")
        lines += levels(runs, task, seeds, first) + regime_contrasts(runs, task, seeds, first)
        starts = [pair_measures(runs[(task, "plain", s)]) for s in seeds if (task, "plain", s) in runs]
        if starts:
            lines += ["", f"{task}: the twins at the cold start, mean over pairs then seeds: embedding cosine "
                      f"{np.mean([np.nanmean(m['embed']) for m in starts]):.3f}, gradient cosine "
                      f"{np.mean([np.nanmean(m['grad']) for m in starts]):.3f}."]
        lines += placement_lines(runs, task, seeds, first)
    return "\n".join(lines) + "\n"


def plot(fam: dict, path: str):
    """The accounts' predicted signs for H3-H6 and H9 beside the measured means and their 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hs = ("H3", "H4", "H5", "H6", "H9")
    predicted = {"representation": ("-", "-", "-", "-", "0"), "information": ("?", "0", "0", "-", "0"),
                 "side effects": ("?", "0", "0", "0", "-")}  # H3 is the check the representation account needs
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, h in enumerate(hs):
        v = fam[h][0]
        if len(v) >= 2:
            m, half = stats.mean_ci(v)
            ax.errorbar(i, m, yerr=half, fmt="o", color="black" if fam[h][2] else "grey")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(hs)), [f"{h}\n" + "\n".join(f"{k[:4]}: {p[i]}" for k, p in predicted.items())
                                   for i, h in enumerate(hs)], fontsize=7)
    ax.set_ylabel("measured: mean ± 95% t-interval\n(H3: cosine; H4-H9: flawed rate)", fontsize=8)
    ax.set_title("each account's predicted sign and what was measured (black: shown by Holm; representation "
                 "needs H3 and H4 or H5)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.mechanism", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    store.add_matrix_args(p, SEEDS, REPORT, None)
    p.set_defaults(store="results/runs/mechanism", runs="runs/mechanism")
    p.add_argument("--extra-seeds", default=EXTRA_SEEDS, help="the generalization contrasts' further seeds")
    add_endpoint_arg(p)
    args = store.checked_matrix_args(p, p.parse_args(argv))
    args.extra_seeds = store.seed_list(args.extra_seeds) if args.extra_seeds else []
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.tables:
        store.train_or_exit(args, ARMS_OF, arm_overrides, "mechanism.py")
        if args.extra_seeds:
            extra = argparse.Namespace(**{**vars(args), "seeds": args.extra_seeds})
            store.train_or_exit(extra, EXTRA_ARMS_OF, arm_overrides, "mechanism.py")
    runs = store.load_store(args.store, ARMS_OF, args.seeds, arm_overrides)[0]
    if any(store.is_stored(os.path.join(args.store, f"text-plain-seed{s}")) for s in args.extra_seeds):
        runs |= store.load_store(args.store, EXTRA_ARMS_OF, args.extra_seeds, arm_overrides)[0]
    os.makedirs(args.out, exist_ok=True)
    store.write_report(os.path.join(args.out, REPORT), "# The mechanism matrix\n\n"
                       + report(runs, args.seeds, args.extra_seeds, args.endpoint_from))
    all_seeds = args.seeds + [s for s in args.extra_seeds if s not in args.seeds]
    plot(registered_family(runs, args.seeds, all_seeds, args.endpoint_from), os.path.join(args.out, FIGURE))


if __name__ == "__main__":
    main()

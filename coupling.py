"""Claim 3b where it lives: coupling over sampled twin pairs, its dose-response, an intervention. make coupling

The paper's mechanism is a prediction about pairs of states. A flawed action gains at a state that
overlaps in representation with a state where the same action is good, and gains more the more they
overlap. This script runs the pre-registered matrix of results/PROTOCOL.md ("the sampled-pair matrix"):

  text (Kitchen):  plain GRPO | the oracle classifier (weight 0.5) | plain GRPO with half the training
                   goals withheld (--env-kwargs '{"withhold": seed}', the intervention)
  grid (LavaGrid): plain GRPO | the oracle classifier

Every run of one (task, seed) starts from one shared cold start (compare.py's machinery) and logs the
same --twin-pairs sampled pairs (grpo_cls.pair_diagnostics). Each finished run is stored, compressed,
under results/runs/coupling/ with its cold start, so the matrix resumes on another machine and
`python coupling.py --tables` regenerates every table and figure from the stored runs without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
import time

import gymnasium as gym
import numpy as np

import compare as c
import envs
import grpo_cls as g

SEEDS = "8201-8210"  # fresh: never used before this matrix (results/PROTOCOL.md)
ITERS = 60
PAIRS = 128
STORE = "results/runs/coupling"
ARMS_OF = {"text": ("plain", "cls-oracle", "withhold"), "grid": ("plain", "cls-oracle")}
ALPHA = 0.05  # Holm's family-wise error rate over the primary family


def arm_overrides(task: str, arm: str, seed: int) -> dict:
    """The Config fields of an arm beyond the task's; every arm logs the same PAIRS pairs."""
    over = {"twin_pairs": PAIRS, "baseline": "none"}
    if arm == "cls-oracle":
        over |= c.ARMS["cls-oracle"]
    if arm == "withhold":  # Kitchen only: a random half of the training goals, drawn by the seed, never trained
        over |= {"env_kwargs": json.dumps({"withhold": seed})}
    return over


# ---------------------------------------------------------------------------------------------
# Stored runs: results/runs/coupling/<task>-<arm>-seed<s>/ and init/<task>-seed<s>/
# ---------------------------------------------------------------------------------------------

def is_stored(dest: str) -> bool:
    return os.path.isfile(os.path.join(dest, "config.json"))  # a stored folder is complete or absent


def store(run: str, dest: str, names: tuple):
    """Copy `names` from a run folder into dest, .gz ones compressed, all or nothing: written into a
    temporary folder, renamed into place last."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in names:
        if name.endswith(".gz"):
            with open(os.path.join(run, name[:-3]), "rb") as f, \
                    gzip.GzipFile(os.path.join(tmp, name), "wb", mtime=0) as out:  # the same bytes every time
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(os.path.join(run, name), os.path.join(tmp, name))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


RUN_NAMES = ("config.json", "summary.json", "metrics.jsonl.gz")  # a finished run
INIT_NAMES = ("config.json", "checkpoint.pt")  # a cold start: the weights every arm of its seed starts from


def unpack(stored: str, run: str):
    """The other way: a stored run or cold start into a run folder, where compare.is_done finds it."""
    os.makedirs(run, exist_ok=True)
    for name in os.listdir(stored):
        if name.endswith(".gz"):
            with gzip.open(os.path.join(stored, name), "rb") as f, open(os.path.join(run, name[:-3]), "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(os.path.join(stored, name), os.path.join(run, name))


def load_rows(stored: str) -> list[dict]:
    with gzip.open(os.path.join(stored, "metrics.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# The per-pair measures (results/PROTOCOL.md, the sampled-pair matrix)
# ---------------------------------------------------------------------------------------------

def pair_measures(rows: list[dict]) -> dict:
    """Per pair i, over the diagnostic iterations t (iteration 0, the cold start, first):
      gain_i    = mean_{t>0} log pi_t(a_i | s_flawed) - log pi_0(a_i | s_flawed)   (the absolute measure)
      control_i = the same for the mean pi of the other flawed actions at s_flawed
      C1_i      = gain_i - control_i                                               (the relative measure)
    and the overlap at the cold start: grad_i (cosine of the gradients of log pi(a_i|.) at the two twins)
    and embed_i (cosine of phi at the two twins). Arrays of shape (P,); C1 is nan where a pair has no
    other flawed action. curve: C1 at each diagnostic iteration, (T, P); pi0: log pi_0(a_i | s_flawed)."""
    diag = [r for r in rows if r.get("pair_flawed_probs") is not None]
    if diag[0]["iter"] != 0 or diag[0].get("pair_grad_cos") is None:
        raise ValueError("a run's first pair diagnostics must be its cold start's, with the gradient cosines")
    log = lambda k: np.log(np.maximum(np.array([[np.nan if v is None else v for v in r[k]] for r in diag],  # noqa: E731
                                                 dtype=float), c.PROB_FLOOR))                         # (T, P)
    coupled, control = log("pair_flawed_probs"), log("pair_control_probs")
    ratio = (coupled - control) - (coupled - control)[0]                                               # (T, P)
    return {"iters": np.array([r["iter"] for r in diag]), "curve": ratio,
            "gain": coupled[1:].mean(0) - coupled[0], "control": control[1:].mean(0) - control[0],
            "C1": ratio[1:].mean(0), "pi0": coupled[0],
            "grad": np.array(diag[0]["pair_grad_cos"]), "embed": np.array(diag[0]["pair_embed_cos"]),
            "flawed": next(r["flawed_rate"] for r in reversed(rows) if r.get("flawed_rate") is not None)}


def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values given their mean rank."""
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    values, counts = np.unique(v, return_counts=True)
    for x in values[counts > 1]:
        r[v == x] = r[v == x].mean()
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation over the pairs where both are defined (nan if either is constant)."""
    ok = ~(np.isnan(x) | np.isnan(y))
    rx, ry = ranks(x[ok]), ranks(y[ok])
    return float(np.corrcoef(rx, ry)[0, 1]) if ok.sum() > 2 and rx.std() > 0 and ry.std() > 0 else float("nan")


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman(x, y) with z held fixed: (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))."""
    ok = ~(np.isnan(x) | np.isnan(y) | np.isnan(z))
    xy, xz, yz = spearman(x[ok], y[ok]), spearman(x[ok], z[ok]), spearman(y[ok], z[ok])
    return float((xy - xz * yz) / np.sqrt((1 - xz**2) * (1 - yz**2)))


def defined(values: list) -> list:
    """The seeds' values that are numbers: a statistic undefined on a seed (an empty group, a constant
    input) leaves that seed out of its test, and the table says how many seeds remain."""
    return [v for v in values if v is not None and not np.isnan(v)]


def sign_flip_p(values: list) -> float:
    """The exact two-sided sign-flip test of mean 0 over seeds: the share of the 2^n sign patterns whose
    mean is at least as far from 0 as the observed one (no normality assumed; 2^-(n-1) at the least)."""
    v = np.asarray(values, dtype=float)
    if np.isnan(v).any():
        raise ValueError("sign_flip_p: a value is nan; pass defined(values)")
    signs = 1 - 2 * ((np.arange(2 ** len(v))[:, None] >> np.arange(len(v))) & 1)   # (2^n, n) of +-1
    return float((np.abs(signs @ v) >= abs(v.sum()) * (1 - 1e-12)).mean())


def holm(p: dict, alpha: float = ALPHA) -> dict:
    """Holm's step-down: name -> rejected at family-wise error alpha."""
    out, names = {}, sorted(p, key=p.get)
    for k, name in enumerate(names):
        if p[name] > alpha / (len(names) - k):
            return out | {n: False for n in names[k:]}
        out[name] = True
    return out


# ---------------------------------------------------------------------------------------------
# Per-seed statistics and the primary family
# ---------------------------------------------------------------------------------------------

def per_seed(m: dict, pairs: list, plain: dict | None = None, withheld=None) -> dict:
    """One seed's numbers over its pairs. With `plain` (the same seed's plain run): the arm's change of
    the absolute gain, d_i = gain_i - gain_i(plain), and its rank correlation with the overlap. With
    `withheld` (Kitchen): the intervention's contrast, mean C1 of the pairs whose good twin's goal is
    trained minus that of those whose good twin's goal is withheld, over the pairs whose flawed twin's goal
    is trained and whose C1 is defined. Secondary: the same on the distinct pairs only (the sampler can
    draw one pair twice), and the correlations with log pi_0(a | s_flawed) held fixed."""
    grad = m["grad"] if plain is None else plain["grad"]  # the cold start's, which every arm shares
    high = grad > np.median(grad)
    first = distinct(pairs)
    out = {"C1": float(np.nanmean(m["C1"])), "rho": spearman(grad, m["C1"]),
           "rho_embed": spearman(m["embed"], m["C1"]), "gain": float(m["gain"].mean()),
           "rho_gain": spearman(grad, m["gain"]), "C1_high": float(np.nanmean(m["C1"][high])),
           "C1_low": float(np.nanmean(m["C1"][~high])), "flawed": m["flawed"],
           "rho_pi0": spearman(grad, m["pi0"]), "rho_given_pi0": partial_spearman(grad, m["C1"], m["pi0"]),
           "C1_distinct": float(np.nanmean(m["C1"][first])), "rho_distinct": spearman(grad[first], m["C1"][first]),
           "n_distinct": int(first.sum()), "n_C1": int((~np.isnan(m["C1"])).sum()),
           "overlap_median": float(np.median(grad)),
           "gain_low6": float(m["gain"][grad <= np.quantile(grad, 1 / 6)].mean()),
           "gain_high6": float(m["gain"][grad >= np.quantile(grad, 5 / 6)].mean()),
           "C1_high_t20": float(np.nanmean(m["curve"][list(m["iters"]).index(20), high])) if 20 in m["iters"] else None,
           "C1_high_end": float(np.nanmean(m["curve"][-1, high]))}
    if plain is not None:
        d = m["gain"] - plain["gain"]
        out |= {"d": float(d.mean()), "rho_d": spearman(grad, d), "d_high": float(d[high].mean()),
                "d_low": float(d[~high].mean()), "rho_d_given_pi0": partial_spearman(grad, d, m["pi0"])}
    if withheld is not None:
        out |= intervention_contrast(m["C1"], pairs, withheld)
    return out


def intervention_contrast(C1: np.ndarray, pairs: list, withheld) -> dict:
    """mean C1(T) - mean C1(U), T and U as per_seed says; also over the pairs whose visited side (the
    state the sampler's agent reached under that goal) is the flawed twin."""
    good_out = np.array([p["goal_good"] in withheld for p in pairs])
    ok = np.array([p["goal_flawed"] not in withheld for p in pairs]) & ~np.isnan(C1)
    seen = np.array([p.get("visited") == "flawed" for p in pairs])
    diff = lambda keep: float(C1[keep & ~good_out].mean() - C1[keep & good_out].mean())  # noqa: E731
    n = lambda keep: ((keep & ~good_out).sum(), (keep & good_out).sum())  # noqa: E731
    if min(n(ok)) == 0:
        return {"contrast": float("nan"), "contrast_seen": float("nan"), "n_trained": 0, "n_untrained": 0}
    return {"contrast": diff(ok), "contrast_seen": diff(ok & seen) if min(n(ok & seen)) else float("nan"),
            "n_trained": int(n(ok)[0]), "n_untrained": int(n(ok)[1])}


def distinct(pairs: list) -> np.ndarray:
    """(P,) bool: True at the first draw of each distinct (good twin, flawed twin, action)."""
    key = lambda p: (str(p["obs_good"].tolist() if hasattr(p["obs_good"], "tolist") else p["obs_good"]),  # noqa: E731
                     str(p["obs_flawed"].tolist() if hasattr(p["obs_flawed"], "tolist") else p["obs_flawed"]),
                     p["action"])
    seen, out = set(), []
    for p in pairs:
        out.append(key(p) not in seen)
        seen.add(key(p))
    return np.array(out)


def pairs_of(task: str, seed: int) -> list[dict]:
    """The PAIRS pairs every run of (task, seed) logged: the sampler is a pure function of the seed, and
    grpo_cls.probes_and_pairs calls it on the default env (a withhold run's env samples from every goal)."""
    if task.startswith("text"):
        return envs.KitchenEnv(split="train").twin_pairs(PAIRS, seed=seed)
    if task == "grid":
        return envs.LavaGridEnv(split="train").twin_pairs(PAIRS, seed=seed)
    env_id = g.ENV_ALIASES.get(c.TASKS[task]["env"], c.TASKS[task]["env"])  # a MiniGrid room
    return gym.make(env_id, split="train").unwrapped.twin_pairs(PAIRS, seed=seed)


def seed_table(runs: dict, seeds: list[int], arms_of: dict | None = None) -> tuple[dict, list]:
    """(task, arm) -> {statistic: [one value per seed]}, over the seeds where the arm's run and the
    seed's plain run are both stored; and the (task, arm, seed) cells that are missing. The
    intervention's statistic is a difference in differences: the contrast in the withhold run minus the
    same pairs' contrast in the plain run. Every arm of a seed must share the plain run's iteration 0."""
    stats, missing = {}, []
    for task, arms in (arms_of or ARMS_OF).items():
        for s in seeds:
            if (task, "plain", s) not in runs:
                missing += [(task, a, s) for a in arms]
                continue
            plain, pairs = pair_measures(runs[(task, "plain", s)]), pairs_of(task, s)
            if len(pairs) != len(plain["C1"]):
                raise ValueError(f"{task} seed {s}: the run logged {len(plain['C1'])} pairs, the sampler gives "
                                 f"{len(pairs)}")
            w = envs.KitchenEnv.withheld_goals(s) if task == "text" else None
            base = per_seed(plain, pairs, withheld=w)
            for arm in arms:
                if (task, arm, s) not in runs:
                    missing.append((task, arm, s))
                    continue
                if arm == "plain":
                    row = base
                else:
                    m = pair_measures(runs[(task, arm, s)])
                    if not (np.array_equal(m["pi0"], plain["pi0"]) and np.array_equal(m["grad"], plain["grad"])):
                        raise ValueError(f"{task} {arm} seed {s} did not start from the plain run's cold start")
                    row = per_seed(m, pairs, plain, w)
                if arm == "withhold":
                    row["did"] = row["contrast"] - base["contrast"]
                    row["did_seen"] = row["contrast_seen"] - base["contrast_seen"]
                for k, v in row.items():
                    stats.setdefault((task, arm), {}).setdefault(k, []).append(v)
    return stats, missing


PRIMARY = {  # name -> (task, arm, the statistics that must all be positive (+) or negative (-))
    "H1 coupling, text": ("text", "plain", {"C1": +1, "rho": +1}),
    "H2 coupling, grid": ("grid", "plain", {"C1": +1, "rho": +1}),
    "H3 classifier flattens, text": ("text", "cls-oracle", {"rho_d": -1}),
    "H4 classifier flattens, grid": ("grid", "cls-oracle", {"rho_d": -1}),
    "H5 intervention, text": ("text", "withhold", {"did": +1}),
}


def family(stats: dict, primary: dict | None = None) -> dict:
    """Each primary hypothesis: its p (intersection-union: the largest sign-flip p of its statistics, and
    1 where a mean has the wrong sign) and whether Holm's procedure over the family rejects it."""
    p, primary = {}, primary or PRIMARY
    for name, (task, arm, signs) in primary.items():
        ps = []
        for k, sign in signs.items():
            v = defined(stats.get((task, arm), {}).get(k, []))
            ps.append(sign_flip_p(v) if len(v) >= 2 and np.sign(np.mean(v)) == sign else 1.0)
        p[name] = max(ps)
    shown = holm(p)
    return {name: (p[name], shown[name]) for name in primary}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

ROWS = [  # (statistic, what it is); the primary family's are marked in the table
    ("C1", "mean C1 over pairs (relative: coupled action against the other flawed actions)"),
    ("rho", "Spearman(cold-start grad cosine, C1) over pairs"),
    ("rho_embed", "Spearman(cold-start embed cosine, C1) over pairs"),
    ("C1_high", "mean C1, pairs above the median grad cosine"),
    ("C1_low", "mean C1, pairs at or below it"),
    ("C1_high_t20", "C1 at iteration 20, high-overlap half"),
    ("C1_high_end", "C1 at the last iteration, high-overlap half"),
    ("overlap_median", "median cold-start grad cosine of the pairs"),
    ("gain", "mean gain (absolute: Δ log pi(a | s_flawed))"),
    ("gain_low6", "mean gain, the sixth of pairs with the lowest overlap"),
    ("gain_high6", "mean gain, the sixth with the highest"),
    ("rho_gain", "Spearman(cold-start grad cosine, gain)"),
    ("rho_pi0", "Spearman(cold-start grad cosine, log pi_0(a | s_flawed))"),
    ("rho_given_pi0", "Spearman(grad cosine, C1), log pi_0 held fixed"),
    ("C1_distinct", "mean C1, distinct pairs only"),
    ("rho_distinct", "Spearman(grad cosine, C1), distinct pairs only"),
    ("n_distinct", "distinct pairs of the 128"),
    ("d", "arm minus plain GRPO: mean change of the gain"),
    ("rho_d", "Spearman(cold-start grad cosine, that change)"),
    ("rho_d_given_pi0", "the same, log pi_0 held fixed"),
    ("d_high", "that change, pairs above the median grad cosine"),
    ("d_low", "that change, pairs at or below it"),
    ("contrast", "mean C1, good twin's goal trained (T) minus withheld (U)"),
    ("n_trained", "pairs in T (flawed twin's goal trained, C1 defined)"),
    ("n_untrained", "pairs in U"),
    ("did", "that contrast, withhold run minus plain run (same pairs)"),
    ("did_seen", "the same, pairs whose flawed twin is the side the sampler visited"),
    ("flawed", "final flawed rate"),
]


NUMBER = {4: "four", 5: "five", 6: "six"}


def stat_cell(values: list, n: int) -> str:
    """'mean ± half-width (p ...)', with 'k/n seeds' when the statistic is undefined on some seeds."""
    v = defined(values)
    if len(v) < 2:
        return f"undefined ({len(v)}/{n} seeds)"
    if all(float(x).is_integer() for x in v):  # a count
        return f"{np.mean(v):.1f} (from {min(v):.0f} to {max(v):.0f})"
    m, h = c.mean_ci(v)
    p = sign_flip_p(v)
    return (f"{m:+.3f} ± {h:.3f} (p {p:.3f})" if p >= 0.001 else f"{m:+.3f} ± {h:.3f} (p {p:.4f})") + (
        f" ({len(v)}/{n} seeds)" if len(v) < n else "")


def report(stats: dict, seeds: list[int], missing: list, run_minutes: float, iters: int, store_dir: str,
           arms_of: dict | None = None, hypotheses: dict | None = None, script: str = "coupling.py",
           target: str = "coupling", matrix: str = "the sampled-pair matrix") -> str:
    arms_of, hypotheses = arms_of or ARMS_OF, hypotheses or PRIMARY
    fam = family(stats, hypotheses)
    n = len(seeds)
    primary = {(t, a, k) for t, a, signs in hypotheses.values() for k in signs}
    lines = [f"Generated by `python {script} --tables` from the stored runs in {store_dir}/ (trained by `make "
             f"{target}`; one thread a run, {run_minutes:.0f} CPU-minutes in all, cold starts counted once): "
             f"{iters}-iteration runs, seeds {seeds[0]}-{seeds[-1]}, {PAIRS} sampled twin pairs per (task, "
             f"seed). Each cell: the mean over the seeds of the per-seed statistic ± the half-width of its 95% "
             f"Student-t interval, then the exact two-sided sign-flip p over the seeds. Rows in bold are the "
             f"primary family's; every other row is exploratory (results/PROTOCOL.md, {matrix}).",
             "", f"### The primary family (Holm at 5% over {NUMBER.get(len(hypotheses), len(hypotheses))})", "",
             "| hypothesis | p (intersection-union) | verdict, Holm-corrected |", "|---|---|---|"]
    for name, (p, shown) in fam.items():
        lines.append(f"| {name} | {p:.4f} | {'**shown**' if shown else 'not shown'} |")
    if missing:
        lines += ["", "Missing runs (reported, never replaced): " + ", ".join(f"{t} {a} seed {s}"
                                                                           for t, a, s in missing)]
    for task, arms in arms_of.items():
        lines += ["", f"### {task}", "", "| statistic | " + " | ".join(arms) + " |",
                  "|---" * (len(arms) + 1) + "|"]
        for k, text in ROWS:
            cells = [stat_cell(stats[(task, arm)][k], n) if k in stats.get((task, arm), {}) else "" for arm in arms]
            cells = [f"**{x}**" if (task, arm, k) in primary else x for x, arm in zip(cells, arms)]
            if any(cells):
                lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_minutes(runs: dict) -> float:
    """The single-thread minutes the stored runs took: each arm's training, and each cold start once
    (every arm's wall_s starts from its cold start's)."""
    train = sum(rows[-1]["wall_s"] - rows[0]["wall_s"] for rows in runs.values())
    cold = {(t, s): rows[0]["wall_s"] for (t, _, s), rows in runs.items()}
    return (train + sum(cold.values())) / 60


def plot_dose(runs: dict, seeds: list[int], path: str, tasks=None):
    """The dose-response: each pair's cold-start gradient cosine against its C1 (top) and its absolute
    gain (bottom), pooled over seeds, plain GRPO against the classifier, with the mean in overlap bins."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2), squeeze=False)
    for col, task in enumerate(tasks or ARMS_OF):
        for row, key in enumerate(("C1", "gain")):
            ax = axes[row, col]
            for arm, colour in (("plain", "tab:red"), ("cls-oracle", "tab:blue")):
                have = [s for s in seeds if (task, arm, s) in runs and (task, "plain", s) in runs]
                ms = [pair_measures(runs[(task, arm, s)]) for s in have]
                x = np.concatenate([pair_measures(runs[(task, "plain", s)])["grad"] for s in have])
                y = np.concatenate([m[key] for m in ms])
                ax.scatter(x, y, s=4, alpha=0.25, color=colour)
                edges = np.quantile(x, np.linspace(0, 1, 7))
                bins = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, 5)
                mids = [np.nanmean(x[bins == b]) for b in range(6)]
                ax.plot(mids, [np.nanmean(y[bins == b]) for b in range(6)], "o-", color=colour,
                        label=f"{'plain GRPO' if arm == 'plain' else 'oracle classifier'} (sextile means)")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("cold-start gradient cosine of the twins (overlap)", fontsize=8)
            ax.set_ylabel({"C1": "C1: Δ log-ratio, coupled vs other flawed",
                           "gain": "gain: Δ log pi(a | flawed twin)"}[key], fontsize=8)
            ax.set_title(f"{task}: {len(seeds)} seeds x {PAIRS} pairs", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

def add_matrix_args(p: argparse.ArgumentParser, seeds: str, report: str, doc: str | None):
    """The flags every stored-run matrix takes (coupling.py, channels.py, repaired.py, replicate.py); --no-doc
    where the matrix writes a doc's block."""
    p.add_argument("--seeds", default=seeds, help="seeds of every cell; verdicts come from the protocol's")
    p.add_argument("--iters", type=int, default=ITERS, help="GRPO iterations per run")
    p.add_argument("--tables", action="store_true", help=f"train nothing: {report} from --store")
    p.add_argument("--store", default=STORE, help="folder of the stored runs (read, and written after each run)")
    p.add_argument("--runs", default="runs/coupling", help="folder of the working run folders")
    p.add_argument("--out", default="results", help=f"folder for {report}")
    p.add_argument("--workers", type=int, default=2, help="single-thread worker processes (2 cores: 2)")
    if doc:
        p.add_argument("--no-doc", action="store_true", help=f"do not rewrite {doc}'s block")


def checked_matrix_args(p: argparse.ArgumentParser, args):
    """--seeds parsed into a list; one-line errors for what cannot run."""
    try:
        args.seeds = c.seed_list(args.seeds)
    except ValueError:
        p.error("--seeds takes a list like '8201-8210' or '8201,8203'")
    if len(args.seeds) < 2 or args.iters < 1 or args.workers < 1:
        p.error("--seeds needs two seeds; --iters and --workers must be >= 1")
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Claim 3b over sampled twin pairs: the pre-registered matrix of "
                                "results/PROTOCOL.md (make coupling)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_matrix_args(p, SEEDS, "coupling.md and the figures", "docs/claims.md")
    return checked_matrix_args(p, p.parse_args(argv))


def run_or_report(job: tuple) -> tuple:
    """compare.run_job in a worker, with a failure returned rather than raised: one run that fails
    (a non-finite loss, say) is reported as missing and the matrix goes on."""
    try:
        return c.run_job(job), None
    except Exception as e:  # noqa: BLE001  (any failure of one run)
        return job, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def work_and_stored(args, name: str) -> tuple[str, str]:
    """A run's working folder under --runs and its stored copy under --store."""
    return os.path.join(args.runs, name), os.path.join(args.store, name)


def cell_dirs(args, task: str, arm: str, seed: int) -> tuple[str, str]:
    return work_and_stored(args, f"{task}-{arm}-seed{seed}")


def init_dirs(args, task: str, seed: int) -> tuple[str, str]:
    return work_and_stored(args, os.path.join("init", f"{task}-seed{seed}"))


def job_fields(args, task: str, seed: int, overrides: dict, out: str) -> dict:
    return dataclasses.asdict(c.arm_config(task, seed, overrides, args.iters, out))


def train_missing(args, arms_of: dict = ARMS_OF, overrides=arm_overrides) -> float:
    """Run every cell not yet stored, in seed order; store each run as it finishes. Returns the minutes.
    arms_of: task -> arm names; overrides(task, arm, seed) -> the arm's Config fields."""
    import multiprocessing as mp
    from tqdm import tqdm
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it: two 2-thread processes on 2 cores collapse
    t0 = time.time()
    cells = [(t, a, s) for s in args.seeds for t in arms_of for a in arms_of[t]]
    starts = list(dict.fromkeys((t, s) for t, _, s in cells))
    for run, stored in [init_dirs(args, *x) for x in starts] + [cell_dirs(args, *x) for x in cells]:
        if is_stored(stored) and not os.path.isfile(os.path.join(run, "config.json")):
            unpack(stored, run)  # a stored run resumes the matrix on a new machine
    inits = [("init", job_fields(args, t, s, {"twin_pairs": PAIRS}, init_dirs(args, t, s)[0])) for t, s in starts]
    todo = [j for j in inits if not c.is_done(j[1], "checkpoint.pt")]
    c.run_all(todo, args.workers, "cold starts")
    redone = {j[1]["out"] for j in todo}
    for x in starts:
        if not is_stored(init_dirs(args, *x)[1]) or init_dirs(args, *x)[0] in redone:
            store(*init_dirs(args, *x), INIT_NAMES)
    jobs = [("arm", job_fields(args, t, s, overrides(t, a, s), cell_dirs(args, t, a, s)[0]), init_dirs(args, t, s)[0])
            for t, a, s in cells]
    todo_arms = [j for j in jobs if j[2] in redone or not c.is_done(j[1])]  # a new cold start redoes its arms
    stored_as = dict(cell_dirs(args, *x) for x in cells)
    with mp.get_context("spawn").Pool(args.workers) as pool, \
            tqdm(total=len(todo_arms), desc="runs", unit="run") as bar:
        for job, failed in pool.imap_unordered(run_or_report, todo_arms):
            if failed:
                print(f"coupling.py: {job[1]['out']} failed ({failed}); it is reported as missing", file=sys.stderr)
            else:
                store(job[1]["out"], stored_as[job[1]["out"]], RUN_NAMES)
            bar.update()
    for j in jobs:  # finished in a run folder before it could be stored
        if j not in todo_arms and not is_stored(stored_as[j[1]["out"]]):
            store(j[1]["out"], stored_as[j[1]["out"]], RUN_NAMES)
    return (time.time() - t0) / 60


def train_or_exit(args, arms_of: dict, overrides, script: str):
    """train_missing, with the minutes it took printed; Ctrl-C exits in one line (every finished run is kept)."""
    try:
        minutes = train_missing(args, arms_of, overrides)
        print(f"{script}: trained what was missing in {minutes:.1f} min")
    except KeyboardInterrupt:
        sys.exit(f"{script}: interrupted; {args.store} keeps every finished run, and the same command skips them")


def load_store(store_dir: str, arms_of: dict, seeds: list[int], overrides) -> tuple[dict, int]:
    """(task, arm, seed) -> metric rows of every stored run the matrix asks for, and their one length.
    A stored run whose config is not the arm's stops the report."""
    runs, iters = {}, set()
    for t, arms in arms_of.items():
        for a in arms:
            for s in seeds:
                d = os.path.join(store_dir, f"{t}-{a}-seed{s}")
                if not is_stored(d):
                    continue
                saved, want = json.load(open(os.path.join(d, "config.json"))), overrides(t, a, s)
                wrong = [k for k, v in (want | {"seed": s}).items() if k != "baseline" and saved.get(k) != v]
                if wrong:
                    sys.exit(f"coupling.py: {d} is not the run this matrix asks for ({', '.join(wrong)} differ)")
                runs[(t, a, s)], _ = load_rows(d), iters.add(saved["iters"])
    if not runs:
        sys.exit(f"coupling.py: no stored runs in {store_dir}; run the matrix's make target")
    if len(iters) > 1:
        sys.exit(f"coupling.py: the stored runs have different lengths ({sorted(iters)})")
    return runs, iters.pop()


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
        c.update_doc(short, marker="pairs", path="docs/claims.md", writer="coupling.py")
    print(block)


if __name__ == "__main__":
    main()

"""The per-pair analysis of stored runs that the studies share (results/PROTOCOL.md, the sampled-pair
matrix): each twin pair's coupling measures read from a run's logged pair diagnostics, one seed's
statistics over its pairs, the primary family's Holm-corrected verdicts, the report's tables, the
dose-response figure, and the dose-response table of any matrix that logs the same pairs.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

import envs
import grpo_cls as g
from studies.stats import PROB_FLOOR, defined, holm, mean_ci, partial_spearman, sign_flip_p, spearman
from studies.store import PAIRS, TASKS

ARMS_OF = {"text": ("plain", "cls-oracle", "withhold"), "grid": ("plain", "cls-oracle")}  # the sampled-pair matrix's


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
                                                 dtype=float), PROB_FLOOR))                           # (T, P)
    coupled, control = log("pair_flawed_probs"), log("pair_control_probs")
    ratio = (coupled - control) - (coupled - control)[0]                                               # (T, P)
    return {"iters": np.array([r["iter"] for r in diag]), "curve": ratio,
            "gain": coupled[1:].mean(0) - coupled[0], "control": control[1:].mean(0) - control[0],
            "C1": ratio[1:].mean(0), "pi0": coupled[0],
            "grad": np.array(diag[0]["pair_grad_cos"]), "embed": np.array(diag[0]["pair_embed_cos"]),
            "flawed": next(r["flawed_rate"] for r in reversed(rows) if r.get("flawed_rate") is not None)}


def logged(row: dict, key: str) -> np.ndarray:
    """(P,) a metric row's per-pair list, a pair logged as None read as nan."""
    return np.array([np.nan if v is None else v for v in row[key]], dtype=float)


def head_start(rows: list[dict]) -> np.ndarray:
    """(P,) l0_i: the coupled action's cold-start log probability over its control's, from the same logged
    probabilities as C1 (floored as C1's are); nan where s_flawed has no other flawed action."""
    first = next(r for r in rows if r.get("pair_flawed_probs") is not None)
    if first["iter"] != 0:
        raise ValueError("a run's first pair diagnostics must be its cold start's")
    coupled, control = logged(first, "pair_flawed_probs"), logged(first, "pair_control_probs")
    return np.log(np.maximum(coupled, PROB_FLOOR)) - np.log(np.maximum(control, PROB_FLOOR))


def end_cosines(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(P,) each: the twins' embedding and gradient cosines at the run's last pair diagnostics with both
    (the cold start and the last iteration log the gradient cosines)."""
    last = next(r for r in reversed(rows) if r.get("pair_grad_cos") is not None)
    if last["iter"] == 0:
        raise ValueError("a run's gradient cosines must be logged at its end as well as at its cold start")
    return logged(last, "pair_embed_cos"), logged(last, "pair_grad_cos")


# ---------------------------------------------------------------------------------------------
# Per-seed statistics and the primary family
# ---------------------------------------------------------------------------------------------

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


def pairs_of(task: str, seed: int) -> list[dict]:
    """The PAIRS pairs every run of (task, seed) logged: the sampler is a pure function of the seed, and
    grpo_cls.probes_and_pairs calls it on the default env (a withhold run's env samples from every goal)."""
    if TASKS[task]["env"] == "text":  # Kitchen, in every regime (text-mlm, text-weak, ...)
        return envs.KitchenEnv(split="train").twin_pairs(PAIRS, seed=seed)
    if TASKS[task]["env"] == "grid":
        return envs.LavaGridEnv(split="train").twin_pairs(PAIRS, seed=seed)
    env_id = g.ENV_ALIASES.get(TASKS[task]["env"], TASKS[task]["env"])  # a MiniGrid room or the TextWorld games
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
    m, h = mean_ci(v)
    p = sign_flip_p(v)
    return (f"{m:+.3f} ± {h:.3f} (p {p:.3f})" if p >= 0.001 else f"{m:+.3f} ± {h:.3f} (p {p:.4f})") + (
        f" ({len(v)}/{n} seeds)" if len(v) < n else "")


def report(stats: dict, seeds: list[int], missing: list, run_minutes: float, iters: int, store_dir: str,
           arms_of: dict | None = None, hypotheses: dict | None = None, script: str = "studies.coupling",
           target: str = "coupling", matrix: str = "the sampled-pair matrix") -> str:
    arms_of, hypotheses = arms_of or ARMS_OF, hypotheses or PRIMARY
    fam = family(stats, hypotheses)
    n = len(seeds)
    primary = {(t, a, k) for t, a, signs in hypotheses.values() for k in signs}
    lines = [f"Generated by `python -m {script} --tables` from the stored runs in {store_dir}/ (trained by `make "
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
    tasks = list(tasks or ARMS_OF)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.2), squeeze=False)  # a column a task
    for col, task in enumerate(tasks):
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


def dose_response_lines(runs: dict, task: str, arms, seeds) -> list[str]:
    """per_seed's pair measures under each arm, against the same seed's plain run (a table)."""
    lines = ["| | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    stats = {}
    for s in seeds:
        if (task, "plain", s) not in runs:
            continue
        plain, pairs = pair_measures(runs[(task, "plain", s)]), pairs_of(task, s)
        for arm in arms:
            if (task, arm, s) in runs:
                m = plain if arm == "plain" else pair_measures(runs[(task, arm, s)])
                if len(pairs) != len(m["C1"]) or not (np.array_equal(m["pi0"], plain["pi0"])
                                                     and np.array_equal(m["grad"], plain["grad"])):
                    raise ValueError(f"{task} {arm} seed {s}: not the plain run's cold start and pairs")
                row = per_seed(m, pairs, None if arm == "plain" else plain)
                for k, v in row.items():
                    stats.setdefault(arm, {}).setdefault(k, []).append(v)
    for k, text in [("C1", "mean C1"), ("rho", "Spearman(overlap, C1)"), ("gain", "mean gain"),
                    ("d", "arm minus plain: change of the gain"), ("rho_d", "Spearman(overlap, that change)"),
                    ("d_high", "that change, high-overlap half"), ("d_low", "that change, low-overlap half")]:
        lines.append(f"| {text} | " + " | ".join(stat_cell(stats.get(a, {}).get(k, []), len(seeds))
                                                 if k in stats.get(a, {}) else "" for a in arms) + " |")
    return lines

"""The statistics the studies share (results/PROTOCOL.md): Student-t intervals over seeds and the
pre-registered verdict, Spearman's rank correlation, the exact sign-flip test and Holm's step-down.
Pure functions of their inputs; the tests check them exactly (studies/test_studies.py)."""

from __future__ import annotations

import numpy as np

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t
PROB_FLOOR = 1e-12  # a probability logged as 0 (float underflow) is read as this before its log
ALPHA = 0.05  # Holm's family-wise error rate over the primary family


# ---------------------------------------------------------------------------------------------
# Means over seeds, with their 95% Student-t intervals
# ---------------------------------------------------------------------------------------------

def t975(df: int) -> float:
    """The 97.5% quantile of Student's t: exact to 3 decimals from the table, and for df >= 10 the
    Cornish-Fisher expansion around the normal's 1.96 (within 0.005 of the exact value)."""
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    v = np.asarray(values, dtype=float)
    half = t975(len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(half)


def cell(values: list, digits: int, n: int) -> str:
    """'mean ± half-width', with 'k/n' when only k of the n seeds have a value."""
    got = [v for v in values if v is not None]
    if not got:
        return f"not reached (0/{n})"
    m, h = mean_ci(got)
    text = f"{m:.{digits}f} ± {h:.{digits}f}" if digits else f"{m:,.0f} ± {h:,.0f}"
    return text + (f" ({len(got)}/{n})" if len(got) < n else "")


def verdict(values: list, lower_is_better: bool | None = None) -> str:
    """The pre-registered rule (results/PROTOCOL.md): an effect is a paired 95% t-interval that excludes 0."""
    m, h = mean_ci(values)
    if abs(m) <= h:
        return "no effect (CI includes 0)"
    word = "higher" if m > 0 else "lower"
    if lower_is_better is None:
        return word
    return f"{word}: {'better' if (m < 0) == lower_is_better else 'worse'}"


# ---------------------------------------------------------------------------------------------
# Rank correlations over pairs, the sign-flip test over seeds, Holm over a family
# ---------------------------------------------------------------------------------------------

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


def signed_sums(v: np.ndarray) -> np.ndarray:
    """The sum of v under each of the 2^n sign patterns: (2^n,)."""
    signs = 1 - 2 * ((np.arange(2 ** len(v))[:, None] >> np.arange(len(v))) & 1)   # (2^n, n) of +-1
    return signs @ v


def sign_flip_p(values: list) -> float:
    """The exact two-sided sign-flip test of mean 0 over seeds: the share of the 2^n sign patterns whose
    mean is at least as far from 0 as the observed one (no normality assumed; 2^-(n-1) at the least).
    Counted by halves, so that 36 seeds take 2 x 2^18 sums rather than 2^36: every pattern is a pattern of
    the first half plus one of the second, and for each first-half sum a the second-half sums b with
    |a + b| >= |observed| are two ranges of the sorted b."""
    v = np.asarray(values, dtype=float)
    if np.isnan(v).any():
        raise ValueError("sign_flip_p: a value is nan; pass defined(values)")
    t = abs(v.sum()) * (1 - 1e-12)                    # the observed pattern counts despite roundoff
    if t == 0:
        return 1.0
    a, b = signed_sums(v[: len(v) // 2]), np.sort(signed_sums(v[len(v) // 2:]))
    at_or_above = len(b) - np.searchsorted(b, t - a, side="left")                  # a + b >= t
    at_or_below = np.searchsorted(b, -t - a, side="right")                         # a + b <= -t
    return float((at_or_above + at_or_below).sum() / 2 ** len(v))


def holm(p: dict, alpha: float = ALPHA) -> dict:
    """Holm's step-down: name -> rejected at family-wise error alpha."""
    out, names = {}, sorted(p, key=p.get)
    for k, name in enumerate(names):
        if p[name] > alpha / (len(names) - k):
            return out | {n: False for n in names[k:]}
        out[name] = True
    return out

"""A run's endpoint, and contrasts between arms on it paired by seed (results/PROTOCOL.md, the channel
and repaired-label matrices): the training batches' flawed rate late in training, what the reports set
beside it, and a family of contrasts with its exact sign-flip p and Holm's verdict."""

from __future__ import annotations

import numpy as np

from studies.stats import holm, sign_flip_p

ENDPOINT_FROM = 51  # the endpoint: the training batches' flawed rate, mean over iterations 51..60


def add_endpoint_arg(p):
    """--endpoint-from, for the matrices whose reports rest on the endpoint (channels.py, repaired.py)."""
    p.add_argument("--endpoint-from", type=int, default=ENDPOINT_FROM, help="the endpoint's first iteration "
                   "(the protocol's; a shorter run, as make smoke's, needs an earlier one)")


def endpoint(rows: list[dict], first: int = ENDPOINT_FROM) -> float:
    """The training batches' flawed rate, mean over iterations first.. (128 episodes each)."""
    return float(np.mean([r["train_flawed_rate"] for r in rows if r["iter"] >= first]))


def last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def run_numbers(rows: list[dict], first: int = ENDPOINT_FROM) -> dict:
    """One run's endpoint (from iteration `first`) and what the report sets beside it."""
    late = [r for r in rows if r["iter"] >= first]

    def mean(k):  # over the late iterations that logged k
        v = [r[k] for r in late if r.get(k) is not None]
        return float(np.mean(v)) if v else None
    return {"endpoint": endpoint(rows, first), "flawed": last(rows, "flawed_rate"),
            "success": last(rows, "success_rate"), "ood_success": last(rows, "ood_success_rate"),
            "ood_flawed": last(rows, "ood_flawed_rate"),
            "cos_v_w": last(rows, "cos_v_w"),
            "pg_grad_norm": mean("pg_grad_norm"), "cls_grad_norm": mean("cls_grad_norm"),
            "cls_pg_grad_ratio": mean("cls_pg_grad_ratio"), "cls_oracle_acc": mean("cls_oracle_acc")}


def paired(runs: dict, task: str, arm: str, base: str, seeds, key: str = "endpoint",
           first: int = ENDPOINT_FROM) -> list[float]:
    """arm minus base on each seed where both ran."""
    return [run_numbers(runs[(task, arm, s)], first)[key] - run_numbers(runs[(task, base, s)], first)[key]
            for s in seeds if (task, arm, s) in runs and (task, base, s) in runs]


def family(runs: dict, seeds, contrasts: dict, first: int = ENDPOINT_FROM) -> dict:
    """Each contrast: (its per-seed differences, the sign-flip p, rejected by Holm at 5% over the family).
    A rejected contrast reads "the classifier lower" or "higher" by the sign of its mean."""
    diffs = {name: paired(runs, *spec, seeds, first=first) for name, spec in contrasts.items()}
    p = {name: sign_flip_p(d) if len(d) >= 2 else 1.0 for name, d in diffs.items()}
    rejected = holm(p)
    return {name: (diffs[name], p[name], rejected[name]) for name in contrasts}

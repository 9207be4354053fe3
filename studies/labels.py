"""How good is each label source? Each agent-available source of good/bad labels against the oracle,
on a training-sized batch played by a stored cold-started policy (make compare's tables and
`python -m studies.channels --label-quality`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import grpo_cls as g
from studies import arms
from studies.stats import cell
from studies.store import arm_config

ITERS = 20  # the configs' length (make compare's runs); nothing trains here
LABEL_SOURCES = ("advantage", "step", "loop", "loop-repaired")


def label_quality(task: str, seed: int, init: str) -> dict:
    """How good is each label source? A batch of K x G episodes like a training batch, played by the
    seed's cold-started policy. Per source: the share of steps it labels; among those, how often its
    label agrees with the oracle's flawed flag, and how often the better constant guess would; and on
    flawed steps, its precision (labelled bad and truly flawed, over labelled bad) and recall (labelled
    bad, over all flawed steps of the batch). For 'oracle' labels all of these are 1 by definition."""
    cfg = arm_config(task, seed, {"cls_weight": 0.5, "cls_labels": "step"}, ITERS, "unused")
    plain = arm_config(task, seed, {}, ITERS, "unused")
    device, tok, policy, gen, rng = arms.build(plain)
    policy.load_state_dict(g.load_checkpoint(init)["model"])
    K, G = cfg.tasks_per_iter, cfg.num_generations
    envs_ = g.make_envs(cfg, K * G)
    tasks, seeds = np.repeat(rng.integers(2**31 - 1, size=K), G), rng.integers(2**31 - 1, size=K * G)
    b = g.rollout(policy, envs_, tok, tasks, seeds, gen, device, use_mask=cfg.action_mask == "env", keys=True)
    R = torch.as_tensor(b["reward"], dtype=torch.float32, device=device).view(K, G)
    A = arms.step_advantages(cfg, b, g.group_advantages(R, cfg.scale_rewards).view(-1), device)
    flawed = torch.as_tensor(b["flawed"], device=device)
    out = {}
    for source in LABEL_SOURCES:
        y, labelled = arms.classifier_labels(dataclasses.replace(cfg, cls_labels=source), b, A, device)
        bad = flawed[labelled].float().mean().item()  # a constant guess agrees max(bad, 1 - bad) of the time
        said_bad = labelled & (y > 0)
        precision = flawed[said_bad].float().mean().item() if said_bad.any() else None
        recall = said_bad[flawed].float().mean().item() if flawed.any() else None
        out[source] = (labelled.float().mean().item(), (y[labelled] == flawed[labelled]).float().mean().item(),
                       max(bad, 1 - bad), precision, recall, flawed.float().mean().item())
    return out


def label_table(quality: dict, tasks, seeds) -> list[str]:
    lines = ["| task | label source | share of steps labelled | labels that agree with the oracle | "
             "a constant guess on the same steps | precision on flawed steps | recall on flawed steps | "
             "flawed share of all steps |", "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for source in LABEL_SOURCES:
            cols = zip(*(quality[(t, s)][source] for s in seeds))
            lines.append(f"| {t} | {source} | " + " | ".join(cell(list(c), 2, len(seeds)) for c in cols) + " |")
    return lines

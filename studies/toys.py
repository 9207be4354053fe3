"""The paper's small exact computations that studies.claims and studies.explain share: Lemma 3.1 with a
finite group (exact and by Monte Carlo), and one plain gradient step on the good twin of a pair against
its first-order prediction (gradient coupling)."""

from __future__ import annotations

import numpy as np
import torch

import grpo_cls as g

# ---------------------------------------------------------------------------------------------
# Lemma 3.1, with a finite group
# ---------------------------------------------------------------------------------------------


def lemma31_expected_advantage(q: float, r: float, G: int) -> float:
    """E[A * 1{risky}] for one group member under the mean-only baseline A = R - mean(R).

    Each member takes the risky action with probability q; it lowers the success probability by r.
    The paper's q * r * (q - 1) is the G -> infinity limit; a finite group scales it by (G-1)/G,
    because the member's own reward is part of the mean it is compared with.
    """
    return (G - 1) / G * q * r * (q - 1)


def simulate_lemma31(q: float, r: float, G: int, p_safe: float, n_groups: int, scale: str,
                     rng: np.random.Generator) -> tuple[float, float]:
    """Monte Carlo estimate of E[A * 1{risky}] and its standard error, over n_groups groups of G."""
    risky = rng.random((n_groups, G)) < q                                     # (n, G)
    p_success = np.where(risky, p_safe - r, p_safe)
    R = torch.as_tensor((rng.random((n_groups, G)) < p_success).astype(np.float64))
    A = g.group_advantages(R, scale).numpy()                                  # (n, G)
    x = (A * risky).mean(axis=1)  # one number per group: groups are independent, members are not
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(n_groups))


# ---------------------------------------------------------------------------------------------
# Gradient coupling, one step on the good twin
# ---------------------------------------------------------------------------------------------

def log_prob(policy, tok, obs, mask, action, device):
    x = torch.as_tensor(tok.encode(obs), device=device)[None]             # (1, L)
    m = torch.as_tensor(mask.astype(bool), device=device)[None]           # (1, A)
    return torch.log_softmax(policy(x, m)[0], dim=-1)[0, action]


def one_step_coupling(policy, tok, probe: dict, lr: float, A: float, device) -> tuple[float, float]:
    """Take one plain gradient step (lr, advantage A) on the good twin alone and return
    (actual change of log pi(a | flawed twin), first-order prediction lr * A * <g_good, g_flawed>).
    The policy is restored afterwards."""
    params = [p for n, p in policy.named_parameters() if not n.startswith("cls_")]
    a = probe["action"]
    lp_good = log_prob(policy, tok, probe["obs_good"], probe["mask_good"], a, device)
    lp_bad = log_prob(policy, tok, probe["obs_flawed"], probe["mask_flawed"], a, device)
    g_good = torch.autograd.grad(lp_good, params)
    g_bad = torch.autograd.grad(lp_bad, params)
    predicted = lr * A * sum((x * y).sum() for x, y in zip(g_good, g_bad)).item()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, grad in zip(params, g_good):
            p += lr * A * grad  # gradient ascent on A * log pi(a | s_good)
        after = log_prob(policy, tok, probe["obs_flawed"], probe["mask_flawed"], a, device).item()
        for p, s in zip(params, saved):
            p.copy_(s)
    return after - lp_bad.item(), predicted

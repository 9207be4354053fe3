"""GRPO with a good/bad-action classifier, on toy agent tasks: a minimal, runnable reference.

    make run     # python grpo_cls.py --cls-weight 0.5   (the text task, about a minute on a laptop CPU)
    make test

Paper: Liu et al., "Rethinking Reward Miscalibration of GRPO in Agentic RL" / "Gradient Coupling"
(arXiv:2509.23870); its method is GCD, Generative Classification Disentanglement. GRPO: Shao et al.
(arXiv:2402.03300). Multi-turn GRPO as in verl-agent/GiGPO (arXiv:2505.10978). Squeezing effect:
Ren & Sutherland (arXiv:2407.10490).

The objective, per step sample (s, a) of trajectory j in a group of G trajectories of one task:
    A_j      = (R_j - mean(R)) / (std(R) + eps)                      group-relative advantage
                                                   (--adv gigpo adds omega * A_S per step; step_advantages)
    rho      = pi(a|s) / pi_old(a|s)
    pg_loss  = -min(rho * A_j, clip(rho, 1 - epsilon, 1 + epsilon) * A_j)
    kl       = exp(d) - d - 1,  d = log pi_ref(a|s) - log pi(a|s)    (k3 estimator)
    cls_loss = BCE(c(s, a), y(s, a))                                 y = 1 if the action is bad
    loss     = pg_loss + beta * kl + cls_weight * cls_loss
Symbols -> code: G = num_generations, epsilon = clip range, beta = KL weight, R = the trajectory's
reward that GRPO normalises (the outcome reward, 1 on success; minus lambda per bad step under the
--shaping control), A = advantage, y = label (1 = bad).
The file reads top to bottom: no name is used above its definition (test_the_code_reads_top_to_bottom).
The method is everything above the ruler "Plumbing", and the loop train() after the plumbing.

Deviations from the paper (see the README for the reasons):
  1. The actor is a 2-layer transformer, not an LLM; GCD's *generated* verdict becomes a linear
     classifier head on the same (state, action) embedding that the policy's logit reads.
  2. Labels for the classifier come from the env's oracle (default: an upper bound a real agent lacks),
     the advantage sign, step-level anchors (states that recur within a group), or loops in what the
     agent sees; the paper does not pin its label source down.
     `--cls-design separate` (the action as an input token, as an LLM judge reads it) is the ablation.
  3. The cold start is behaviour cloning on a noisy scripted agent; the prompt-based correction is omitted.
  4. pg_loss and kl average over the steps of groups whose rewards differ (a tied group has A = 0); the
     classifier averages over its labelled steps, in a stream of its own inside the same optimizer steps,
     so that it never changes what the policy-gradient term sees (grpo_update).
  5. `--adv gigpo` (GiGPO's step-level advantage, arXiv:2505.10978) is a baseline for comparison only;
     like every term here it acts on the steps of untied groups only.
  6. `--shaping` is a control the paper does not run: the classifier's labels carried by the reward
     (minus lambda per bad step) instead of by a loss on the pair embedding. So are `--cls-channel
     placebo` (the classifier on permuted labels: its optimizer effects without the information) and
     `--cls-channel policy` (the same labelled steps as a +-1 advantage on log pi, no second head).
  7. Each stream's gradient is clipped to --max-grad-norm on its own, then the two are summed into one
     Adam step. A TRL or verl user would clip the summed loss once; that clip lets the classifier shrink
     the policy-gradient step (joint_clip_pg_scale logs by how much). Adam's moments stay shared
     (adam_pg_step_scale logs their effect; docs/optimizer.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import envs  # registers grpo_cls/LavaGrid-v0, grpo_cls/Kitchen-v0 and the MiniGrid rooms

ENV_ALIASES = {"grid": "grpo_cls/LavaGrid-v0", "text": "grpo_cls/Kitchen-v0",  # MiniGrid rooms, with an oracle:
               **{name: f"grpo_cls/{name}" for name in envs.MINIGRID_ROOMS}}  # pip install minigrid==3.2.0
CLS_LABELS = ("advantage", "oracle", "step", "loop", "loop-repaired")
CLS_DESIGNS = ("shared", "separate")
CLS_CHANNELS = ("head", "placebo", "policy")
ADVANTAGES = ("grpo", "gigpo")
SCALE_REWARDS = ("group", "batch", "none")
ACTION_MASKS = ("env", "none")
SHAPING = ("none", "oracle", "loop")


def short_name(env_id: str) -> str:
    """'text' or 'grid' for our envs, the id with '/' made '_' for any other: run and reference folders."""
    return {v: k for k, v in ENV_ALIASES.items()}.get(env_id, env_id.replace("/", "_"))


# ---------------------------------------------------------------------------------------------
# Config: one dataclass; every field's help text becomes `--help`
# ---------------------------------------------------------------------------------------------

def arg(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    env: str = arg("text", "task: 'grid', 'text', a MiniGrid env in words with an oracle (pip install "
                   "minigrid==3.2.0; MiniGrid-Empty-5x5-v0, MiniGrid-LavaGapS5-v0 and MiniGrid-DoorKey-5x5-v0 "
                   "are held out one size larger, any other MiniGrid-* has no held-out family), or any "
                   "registered gymnasium id")
    env_kwargs: str = arg("{}", "JSON object of keyword arguments for gymnasium.make")
    seed: int = arg(1, "seed for torch, task sampling, env noise and action sampling")
    iters: int = arg(45, "GRPO iterations (rollout + update)")
    tasks_per_iter: int = arg(16, "task instances per iteration; each is run G times")
    num_generations: int = arg(8, "G, trajectories per task (the group)")
    lr: float = arg(1e-3, "Adam learning rate")
    anneal_lr: int = arg(1, "1 = decay the learning rate linearly to 0 over --iters (as CleanRL), "
                         "0 = constant", (0, 1))
    epsilon: float = arg(0.2, "PPO clip range epsilon")
    beta: float = arg(0.0, "beta, weight of the k3 KL to the frozen cold-start policy "
                      "(0 = no reference model)")
    num_iterations: int = arg(1, "update epochs over each batch (TRL's num_iterations)")
    minibatch_size: int = arg(64, "step samples per gradient step")
    scale_rewards: str = arg("group", "advantage scaling: std of the group, of the batch, or none "
                             "(mean only)", SCALE_REWARDS)
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    adv: str = arg("grpo", "per-step advantage: the trajectory's group advantage (grpo), or that plus omega "
                   "times a step-level advantage within anchor groups of identical states (gigpo, "
                   "arXiv:2505.10978)", ADVANTAGES)
    omega: float = arg(1.0, "gigpo: weight omega of the step-level advantage")
    gamma: float = arg(0.95, "discount of the step returns that gigpo and --cls-labels step compare "
                       "(GiGPO's 0.95)")
    cls_weight: float = arg(0.0, "weight of the good/bad classification loss (0 = plain GRPO, no classifier "
                            "built)")
    cls_labels: str = arg("oracle", "classifier labels: the env's oracle flag (an upper bound a real "
                          "agent lacks; the default, as no agent-available source passed docs/cure.md), the "
                          "sign of the trajectory advantage, step-level labels from states that recur within "
                          "a group, or loops in what the agent sees (no progress bad, the loop-erased path "
                          "of a success good; loop-repaired leaves the step that closes a loop unlabelled)",
                          CLS_LABELS)
    cls_design: str = arg("shared", "classifier: a head on the policy's own pair embedding phi(s, a) "
                          "(shared), or a second pass through the trunk with the action as an extra input "
                          "token (separate)", CLS_DESIGNS)
    cls_channel: str = arg("head", "what carries the labels, on the same labelled steps: the classifier "
                           "(head, GCD); the classifier with the labels permuted among each batch's labelled "
                           "steps (placebo: the base rate kept, the information gone); or no classifier loss "
                           "but a policy-gradient term with advantage +1 (good) or -1 (bad), weighted "
                           "--cls-weight (policy: the labels through log pi itself)", CLS_CHANNELS)
    shaping: str = arg("none", "reward-shaping control: the outcome reward minus --shaping-lambda for each "
                       "step the oracle's flag (oracle) or the loop labels (loop) call bad; the classifier's "
                       "information carried by the reward instead", SHAPING)
    shaping_lambda: float = arg(0.05, "lambda, the reward taken off per step labelled bad (--shaping)")
    action_mask: str = arg("env", "env: the policy chooses among the actions info['action_mask'] allows; "
                           "none: among all, and an inadmissible one wastes a step and is flawed (as for an "
                           "LLM agent)", ACTION_MASKS)
    sft_steps: int = arg(150, "cold start: behaviour-cloning steps on a noisy scripted agent (0 = none)")
    sft_noise: float = arg(0.3, "cold start: chance the scripted agent takes a random admissible action")
    sft_lr: float = arg(2e-3, "cold start: Adam learning rate")
    d_model: int = arg(64, "transformer width d")
    n_layers: int = arg(2, "transformer blocks")
    n_heads: int = arg(4, "attention heads")
    eval_every: int = arg(20, "evaluate every N iterations (and at the last)")
    diag_every: int = arg(2, "run the twin-probe diagnostics every N iterations (~30 ms each)")
    twin_pairs: int = arg(64, "sampled twin pairs (the env's twin_pairs(), seeded by --seed) logged with the "
                          "probes, with their gradient cosines at each evaluation (0 = none)")
    eval_tasks: int = arg(128, "fixed task instances per evaluation split (in-domain and held-out)")
    device: str = arg("auto", "auto picks cuda when available", ("auto", "cpu", "cuda"))
    threads: int = arg(2, "torch CPU threads")
    out: str = arg("", "run folder (default runs/<env>-cls<w>-seed<s>)")
    overwrite: bool = arg(False, "allow writing into a non-empty run folder")
    resume: str = arg("", "continue the run in this folder from its checkpoint (flags given override its "
                      "config)")
    quiet: bool = arg(False, "no progress bar or summary")
    no_plots: bool = arg(False, "skip the PNGs at the end of the run (make compare's many short runs)")
    baseline: str = arg("auto", "a stored plain-GRPO run folder to set beside this run in the summary "
                        "and vs_plain.png; auto: results/reference/<env>-plain-seed<seed> when its config "
                        "is this run's but for the classifier; none: off")

    def __post_init__(self):
        """Resolve the env alias and the run folder, and refuse bad input with a one-line ValueError."""
        self.env = ENV_ALIASES.get(self.env, self.env)
        if self.env.startswith("MiniGrid-"):  # any other MiniGrid env: in words, with an oracle, no held-out family
            self.env = envs.register_minigrid(self.env)
        if self.env not in gym.registry:
            raise ValueError(f"--env {self.env!r} is not registered; use 'grid', 'text' or a gymnasium id")
        try:
            kwargs = json.loads(self.env_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--env-kwargs is not valid JSON ({e.msg}); "
                             f"give an object like '{{\"is_slippery\": false}}'")
        if not isinstance(kwargs, dict):
            raise ValueError(f"--env-kwargs must be a JSON object, got {self.env_kwargs!r}")
        try:  # the env's own constructor is the only judge of its keyword arguments
            gym.make(self.env, **kwargs).close()
        except Exception as e:
            why = str(e).splitlines()[0][:200]
            if kwargs:
                raise ValueError(f"--env-kwargs {self.env_kwargs} do not fit {self.env}: {why}")
            raise ValueError(f"--env {self.env} cannot be made: {why}")
        if self.twin_pairs < 0:
            raise ValueError(f"--twin-pairs must be >= 0, got {self.twin_pairs}")
        for name in ("iters", "tasks_per_iter", "num_iterations", "minibatch_size", "eval_every", "diag_every",
                     "eval_tasks", "d_model", "n_layers", "n_heads", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be >= 2 (a group needs a baseline), "
                             f"got {self.num_generations}")
        for name in ("lr", "epsilon", "beta", "max_grad_norm", "cls_weight", "sft_noise", "sft_lr", "omega",
                     "gamma", "shaping_lambda"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise ValueError("--lr must be > 0")
        if self.gamma > 1:
            raise ValueError(f"--gamma must be in [0, 1], got {self.gamma}")
        if self.sft_noise > 1 or self.sft_steps < 0:
            raise ValueError("--sft-noise must be in [0, 1] and --sft-steps >= 0")
        if self.cls_channel not in CLS_CHANNELS:
            raise ValueError(f"--cls-channel must be one of {', '.join(CLS_CHANNELS)}, got {self.cls_channel!r}")
        if self.cls_channel != "head" and self.cls_weight == 0:
            raise ValueError(f"--cls-channel {self.cls_channel} carries the labels in the side stream: give it "
                             f"--cls-weight > 0")
        if self.cls_channel == "policy" and self.cls_design != "shared":
            raise ValueError("--cls-channel policy trains no classifier, so it has no --cls-design; leave it "
                             "shared")
        if self.shaping != "none" and self.cls_weight > 0:
            raise ValueError("--shaping is the classifier's control: use it with --cls-weight 0 (one channel "
                             "at a time)")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --n-heads ({self.n_heads})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use auto or cpu")
        if not self.out:
            channel = "" if self.cls_channel == "head" else f"-{self.cls_channel}"
            self.out = f"runs/{short_name(self.env)}-cls{self.cls_weight:g}{channel}-seed{self.seed}"


# ---------------------------------------------------------------------------------------------
# Observations to tokens: the vocabulary comes from what the env declares, never from data
# ---------------------------------------------------------------------------------------------

def is_small_int_box(space) -> bool:
    """A Box whose bounds are finite integers at most 256 apart: each cell is then one token."""
    return (isinstance(space, gym.spaces.Box)
            and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))
            and np.all(space.low == np.round(space.low)) and np.all(space.high == np.round(space.high))
            and float((space.high - space.low).max()) <= 256)


class Tokenizer:
    """Maps an observation to (L,) token ids. Token 0 is padding, token 1 is <s>, read out by the policy.

    Our envs declare `vocab` (and Kitchen `max_words`); for any other env the vocabulary is read off the
    observation space: Discrete -> one token, MultiDiscrete or a small integer Box -> one token per
    cell, Text -> one token per character.
    """

    def __init__(self, env: gym.Env):
        base, space = env.unwrapped, env.observation_space
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"the action space must be Discrete, got {env.action_space}")
        default_names = [f"action{i}" for i in range(env.action_space.n)]
        self.action_names = list(getattr(base, "action_names", default_names))
        vocab = getattr(base, "vocab", None)
        if isinstance(space, gym.spaces.Text):
            self.kind = "words" if vocab else "chars"
            vocab = vocab or sorted(space.character_set)
            self.seq_len = 1 + (base.max_words if self.kind == "words" else space.max_length)
        elif isinstance(space, gym.spaces.Discrete):
            self.kind, self.low, self.seq_len = "cells", int(space.start), 2
            vocab = vocab or [f"obs{i}" for i in range(space.n)]
        elif isinstance(space, gym.spaces.MultiDiscrete) or is_small_int_box(space):
            low = space.low if isinstance(space, gym.spaces.Box) else np.zeros(space.shape, np.int64)
            high = space.high if isinstance(space, gym.spaces.Box) else space.nvec - 1
            self.kind, self.low, self.seq_len = "cells", low.astype(np.int64), 1 + int(np.prod(space.shape))
            vocab = vocab or [f"v{i}" for i in range(int((high - low).max()) + 1)]
        else:
            raise ValueError(f"unsupported observation space {space}; supported: Discrete, MultiDiscrete, "
                             f"Box with small integer bounds, Text")
        self.words = ["<pad>", "<s>"] + list(vocab)
        self.words += sorted({w for a in self.action_names for w in a.split()} - set(self.words))
        self.index = {w: i for i, w in enumerate(self.words)}
        # (n_act, k) the words of each action's name, padded with 0: actions share word embeddings
        k = max(len(a.split()) for a in self.action_names)
        self.action_tokens = np.zeros((len(self.action_names), k), dtype=np.int64)
        for i, name in enumerate(self.action_names):
            ids = [self.index[w] for w in name.split()]
            self.action_tokens[i, : len(ids)] = ids

    def encode(self, obs) -> np.ndarray:
        ids = np.zeros(self.seq_len, dtype=np.int64)  # (L,)
        ids[0] = 1
        if self.kind == "cells":  # cell value v -> word 2 + v - low
            ids[1:] = (np.asarray(obs) - self.low).reshape(-1) + 2
            return ids
        units = obs.split() if self.kind == "words" else list(obs)
        if len(units) > self.seq_len - 1:
            raise ValueError(f"observation has {len(units)} {self.kind}, more than the {self.seq_len - 1} "
                             f"declared")
        ids[1: 1 + len(units)] = [self.index[u] for u in units]
        return ids


# ---------------------------------------------------------------------------------------------
# Model: a small pre-LN transformer; the policy logit and the classifier read one pair embedding
# Letters: B = samples, L = tokens per observation, n_act = actions, d = width, k = words per action.
# (A is the advantage, everywhere in this file.)
# An observation arrives as (L,) token ids, <s> first (Tokenizer, above).
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, L, d)
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, d/nh); every token sees every token
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, d))
        return x + self.mlp(self.ln2(x))


class Policy(nn.Module):
    """pi(a|s) = softmax_a(w . phi(s, a)) over admissible a, and a good/bad classifier c(s, a).

    phi(s, a) is the policy's own embedding of the (state, action) pair. The 'shared' classifier is
    c = v . phi(s, a): training it on good/bad labels moves phi of good and bad pairs apart, which is
    exactly the representation the policy logit uses. The 'separate' one (the ablation) runs the trunk a
    second time with the action appended as an input token and reads c off that token, as an LLM judge
    that reads the state and the action would: it shapes the shared trunk, but never phi itself.
    """

    def __init__(self, vocab_size: int, seq_len: int, action_tokens: np.ndarray, d: int, n_layers: int,
                 n_heads: int, with_classifier: bool, cls_design: str = "shared"):
        super().__init__()
        self.with_classifier, self.cls_design = with_classifier, cls_design
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.register_buffer("action_tokens", torch.as_tensor(action_tokens))  # (n_act, k)
        self.act_emb = nn.Embedding(len(action_tokens), d)
        # phi(s, a) = gelu(W_s h + W_a u + W_m (h * u)): a one-layer MLP on [h; u; h*u], split so that
        # only the product term is computed per (state, action) pair
        self.pair_s = nn.Linear(d, d)
        self.pair_a, self.pair_m = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.policy_head = nn.Linear(d, 1)
        self.cls_head = nn.Linear(d, 1) if with_classifier else None
        # the separate classifier's action token gets its own position vector, made last so that every
        # other parameter starts as in plain GRPO (as nn.Embedding, N(0, 1))
        self.cls_pos = nn.Parameter(torch.randn(d)) if with_classifier and cls_design == "separate" else None

    def trunk(self, tokens, extra=None):  # (B, L) [, (B, d) one more input vector] -> (B, L [+1], d)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, L, d)
        if extra is not None:  # padding is a token it learns to ignore
            x = torch.cat([x, (extra + self.cls_pos)[:, None]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def state_embedding(self, tokens):  # (B, L) -> h (B, d): the <s> position summarises the observation
        return self.trunk(tokens)[:, 0]

    def action_embedding(self):  # -> u (n_act, d): a per-action vector plus the mean of its words' vectors
        words = self.action_tokens != 0  # (n_act, k)
        word_mean = (self.tok_emb(self.action_tokens) * words[..., None]).sum(1) / words.sum(1, keepdim=True)
        return self.act_emb.weight + word_mean

    def pair_embedding(self, h):  # (B, d) -> phi (B, n_act, d)
        u = self.action_embedding()                                                  # (n_act, d)
        return F.gelu(self.pair_s(h)[:, None] + self.pair_a(u)[None] + self.pair_m(h[:, None] * u[None]))

    def forward(self, tokens, action_mask):
        """tokens (B, L), action_mask (B, n_act) bool -> logits (B, n_act), phi (B, n_act, d), and the shared
        classifier's logits (B, n_act), or None without a shared classifier."""
        phi = self.pair_embedding(self.state_embedding(tokens))
        logits = self.policy_head(phi).squeeze(-1).masked_fill(~action_mask, -1e9)  # (B, n_act)
        cls = self.cls_head(phi).squeeze(-1) if self.with_classifier and self.cls_design == "shared" else None
        return logits, phi, cls

    def classify_separately(self, tokens, a):  # (B, L), (B,) -> (B,) c(s, a), the action as an input token
        return self.cls_head(self.trunk(tokens, self.action_embedding()[a])[:, -1]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# The loss math, as small pure functions
# ---------------------------------------------------------------------------------------------

def group_advantages(R: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """R (K, G) outcome rewards -> A (K, G). A tied group gets exactly 0 whatever the scaling."""
    centred = R - R.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (R.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL
    if scale == "batch":
        return centred / (R.std() + eps)
    return centred  # "none": the mean-only baseline (Dr. GRPO)


def clipped_surrogate(logp, logp_old, A, epsilon: float):
    """PPO-clip per sample: -min(rho * A, clip(rho, 1-eps, 1+eps) * A). All arguments (B,)."""
    rho = torch.exp(logp - logp_old)
    return -torch.min(rho * A, rho.clamp(1 - epsilon, 1 + epsilon) * A)


def kl_k3(logp, logp_ref):
    """k3 estimator of KL(pi || pi_ref) per sample: exp(d) - d - 1 with d = logp_ref - logp (>= 0)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def classification_loss(cls_logit, y, labelled):
    """Mean BCE over labelled samples only. cls_logit, y (1 = bad), labelled (bool) are (B,)."""
    per_sample = F.binary_cross_entropy_with_logits(cls_logit, y.float(), reduction="none")
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)  # no label, no signal; no host sync


# ---------------------------------------------------------------------------------------------
# Advantages and labels per step: GRPO gives every step its trajectory's A; anchors refine it
# ---------------------------------------------------------------------------------------------

def anchor_groups(traj: np.ndarray, state_key: list, G: int) -> list[np.ndarray]:
    """GiGPO's anchors: the steps of one group (G trajectories of one task, traj // G) that share an
    identical observation. traj (S,) trajectory index, state_key (S,) hashable observation. Only anchors
    with at least two steps are returned, as index arrays."""
    anchors: dict = {}
    for i, (j, key) in enumerate(zip(traj, state_key)):
        anchors.setdefault((j // G, key), []).append(i)
    return [np.asarray(idx) for idx in anchors.values() if len(idx) >= 2]


def step_labels(traj: np.ndarray, state_key: list, rtg: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """Classifier labels from anchors: an action whose return-to-go beats its anchor's mean is good
    (y = 0), one below it bad (y = 1); a tie or a state seen once stays unlabelled. rtg (S,)."""
    y, labelled = np.zeros(len(traj), dtype=np.float32), np.zeros(len(traj), dtype=bool)
    for idx in anchor_groups(traj, state_key, G):
        v = rtg[idx]
        y[idx], labelled[idx] = v < v.mean(), ~np.isclose(v, v.mean())
    return y, labelled


def anchor_advantages(traj: np.ndarray, state_key: list, rtg: np.ndarray, G: int, scale: str = "group",
                      eps: float = 1e-4) -> np.ndarray:
    """GiGPO's step-level advantage A_S (S,): within each anchor, (rtg - mean) / (std + eps), or
    rtg - mean for scale 'none' ('batch' also uses the anchor's own std). A step whose state no other
    step of its group shares gets 0."""
    A_S = np.zeros(len(traj))
    for idx in anchor_groups(traj, state_key, G):
        centred = rtg[idx] - rtg[idx].mean()
        A_S[idx] = centred if scale == "none" else centred / (rtg[idx].std(ddof=1) + eps)
    return A_S


def returns_to_go(traj: np.ndarray, reward: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """(S,) discounted sum of the rewards from each step to the end of its trajectory (steps in time
    order)."""
    rtg, running, last = np.zeros(len(traj)), 0.0, None
    for i in range(len(traj) - 1, -1, -1):
        running = (gamma * running if traj[i] == last else 0.0) + reward[i]
        rtg[i], last = running, traj[i]
    return rtg


def loop_labels(traj: np.ndarray, key: list, next_key: list, success: np.ndarray,
                close_bad: bool = True) -> tuple:
    """Labels from what the agent observes, its own action history left out. A step is bad (y = 1) when
    it makes no progress: it starts a detour back to a situation already seen in this episode (every
    step of that loop is bad; "nothing happens" is a loop of one step). Good (y = 0): the steps left on
    the loop-erased path of a successful episode. Other steps stay unlabelled. close_bad=False (the
    repaired labels) leaves unlabelled the step that closes a loop of two or more steps: the step back
    is often on a shortest plan from where the detour led. traj (S,), each trajectory's steps in time
    order; key, next_key (S,) what the agent saw before and after the step; success (N,) per trajectory."""
    y, labelled = np.zeros(len(traj), dtype=np.float32), np.zeros(len(traj), dtype=bool)
    steps_of: dict = {}
    for i, j in enumerate(traj):
        steps_of.setdefault(j, []).append(i)
    for j, idx in steps_of.items():
        path, seen = [], [key[idx[0]]]  # the loop-erased path: its steps, and the situations along it
        for i in idx:
            if next_key[i] in seen:     # back to seen[k]: the steps since then made no progress
                k = seen.index(next_key[i])
                bad = path[k:] + ([i] if close_bad or not path[k:] else [])  # a one-step loop stays bad
                y[bad], labelled[bad] = 1, True
                path, seen = path[:k], seen[:k + 1]
            else:
                path.append(i)
                seen.append(next_key[i])
        if success[j]:
            labelled[path] = True
    return y, labelled


def shaped_rewards(cfg: Config, batch) -> np.ndarray:
    """(N,) the reward GRPO normalises in each group: the outcome reward R, and with --shaping
    R - lambda * (the number of the trajectory's steps that the oracle or the loop labels call bad)."""
    if cfg.shaping == "none":
        return batch["reward"]
    if cfg.shaping == "oracle":
        bad = batch["flawed"]
    else:
        bad = loop_labels(batch["traj"], batch["key"], batch["next_key"], batch["success"])[0] > 0
    return batch["reward"] - cfg.shaping_lambda * np.bincount(batch["traj"], weights=bad,
                                                              minlength=len(batch["reward"]))


def step_returns(batch, gamma: float) -> np.ndarray:
    """(S,) the return-to-go of every step sample, in the batch's order (returns_to_go per trajectory)."""
    traj = batch["traj"]
    order = np.argsort(traj, kind="stable")  # the steps of each trajectory, in time order
    rtg = np.empty(len(order))
    rtg[order] = returns_to_go(traj[order], batch["step_reward"][order], gamma)
    return rtg


def observation_keys(batch) -> list[bytes]:
    """(S,) one hashable key per step sample: identical observation, identical key (GiGPO's anchors)."""
    return [t.tobytes() for t in batch["tokens"]]


def step_advantages(cfg: Config, batch, A_traj, device):
    """The advantage of every step sample, A (S,). grpo: each step gets its trajectory's advantage.
    gigpo: plus omega * A_S from the step's anchor."""
    A = A_traj[torch.as_tensor(batch["traj"], device=device)]           # (S,)
    if cfg.adv != "gigpo":
        return A
    rtg = step_returns(batch, cfg.gamma)
    A_S = anchor_advantages(batch["traj"], observation_keys(batch), rtg, cfg.num_generations, cfg.scale_rewards)
    return A + cfg.omega * torch.as_tensor(A_S, dtype=A.dtype, device=device)


def classifier_labels(cfg: Config, batch, A, device) -> tuple:
    """The side stream's labels (y, labelled), both (S,), y = 1 calling a step's action bad, from the
    source --cls-labels names: 'oracle', the env's flawed flag on every step; 'advantage', A < 0 bad and
    A == 0 unlabelled; 'step', GiGPO's anchors (step_labels); 'loop' and 'loop-repaired', loops in what
    the agent sees (loop_labels)."""
    if cfg.cls_labels == "oracle":
        flawed = torch.as_tensor(batch["flawed"], device=device)
        return flawed.float(), torch.ones_like(flawed, dtype=torch.bool)
    if cfg.cls_labels == "advantage":
        return (A < 0).float(), A != 0
    if cfg.cls_labels == "step":
        y, labelled = step_labels(batch["traj"], observation_keys(batch), step_returns(batch, cfg.gamma),
                                  cfg.num_generations)
    else:
        y, labelled = loop_labels(batch["traj"], batch["key"], batch["next_key"], batch["success"],
                                  close_bad=cfg.cls_labels == "loop")
    return torch.as_tensor(y, device=device), torch.as_tensor(labelled, device=device)


# ---------------------------------------------------------------------------------------------
# Rollout: all K*G envs step in lockstep, one batched forward per step, finished envs masked out
# ---------------------------------------------------------------------------------------------

FORWARD_CHUNK = 64  # bench.py: on a 2-core CPU a forward of 64 samples is ~1.5x faster per sample than 128


@torch.inference_mode()
def rollout(policy, envs_, tok, tasks, seeds, gen, device, max_len=10_000, pick=None, use_mask=True,
            keys=False):
    """Run one episode in every env (env i plays task tasks[i] with seed seeds[i]).

    Returns a dict of step-sample arrays (S = total steps): tokens (S, L), mask (S, n_act) the policy's mask,
    action, logp, traj, flawed, admissible (did the env's own mask allow the action), and per-trajectory
    arrays (N,): reward, success, length, and the first episode's text. With use_mask=False the policy
    chooses among all actions (as an LLM agent does), whatever info["action_mask"] says. With keys=True,
    key and next_key (S,) say what the agent saw before and after each step, without its own action
    history (info["state_key"] where the env gives one, else the observation).
    `pick(env, mask) -> action` replaces the policy (used by the cold start's scripted agent).
    """
    N, n_actions = len(envs_), envs_[0].action_space.n
    options = [None] * N if tasks is None else [{"task": int(t)} for t in tasks]
    obs, info = zip(*(e.reset(seed=int(s), options=o) for e, s, o in zip(envs_, seeds, options)))
    all_legal = np.ones(n_actions, dtype=np.int8)  # for envs that give no action_mask, and for use_mask=False
    obs, masks = list(obs), [i.get("action_mask", all_legal) for i in info]
    view = [i.get("state_key", tok.encode(o).tobytes()) if keys else None for o, i in zip(obs, info)]
    done = np.zeros(N, dtype=bool)
    steps = {k: [] for k in ("tokens", "mask", "action", "logp", "traj", "flawed", "reward", "admissible",
                             "key", "next_key")}  # one entry per step sample, appended by name
    has = {"flawed": False, "success": False, "action_mask": False}  # what the env's info ever gave
    reward, success, length = np.zeros(N), np.zeros(N, dtype=bool), np.zeros(N, dtype=np.int64)
    transcript = [str(obs[0])]
    while not done.all() and length.max() < max_len:
        live = np.flatnonzero(~done)                                         # (n,) envs still running
        x = np.stack([tok.encode(obs[i]) for i in live])                     # (n, L)
        m = np.stack([masks[i] if use_mask else all_legal for i in live]).astype(bool)  # (n, n_act)
        xt, mt = torch.as_tensor(x, device=device), torch.as_tensor(m, device=device)
        chunks = zip(xt.split(FORWARD_CHUNK), mt.split(FORWARD_CHUNK))
        logits = torch.cat([policy(xc, mc)[0] for xc, mc in chunks])
        logp_all = torch.log_softmax(logits, dim=-1)                         # (n, n_act)
        a = torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(1)  # (n,)
        logp = logp_all.gather(1, a[:, None]).squeeze(1)
        a, logp = a.cpu().numpy(), logp.cpu().numpy()                        # one sync per env step
        for j, i in enumerate(live):
            act = int(a[j]) if pick is None else pick(envs_[i], masks[i])
            o, r, term, trunc, inf = envs_[i].step(act)
            flawed = bool(inf.get("flawed", False))
            after = inf.get("state_key", tok.encode(o).tobytes()) if keys else None
            allowed = bool(masks[i][act])  # the env's own verdict, whether or not the policy was masked
            sample = {"tokens": x[j], "mask": m[j], "action": act, "logp": logp[j], "traj": i, "flawed": flawed,
                      "reward": r, "admissible": allowed, "key": view[i], "next_key": after}
            for k, v in sample.items():
                steps[k].append(v)
            has = {k: seen or k in inf for k, seen in has.items()}
            if i == 0:
                transcript.append(f"> {tok.action_names[act]}{'   [flawed]' if flawed else ''}\n{o}")
            obs[i], masks[i], view[i] = o, inf.get("action_mask", all_legal), after
            reward[i] += r
            length[i] += 1
            if term or trunc:
                done[i], success[i] = True, bool(inf.get("success", False))
    batch = {k: np.asarray(v) for k, v in steps.items() if k not in ("key", "next_key")}
    batch["step_reward"] = batch.pop("reward")  # (S,) reward of each step; "reward" below is per trajectory
    batch.update(reward=reward, success=success, length=length, transcript="\n".join(transcript),
                 has_oracle=has["flawed"], has_success=has["success"], has_mask=has["action_mask"],
                 key=steps["key"], next_key=steps["next_key"])
    return batch


# ---------------------------------------------------------------------------------------------
# The update: loss = pg_loss + beta * kl + cls_weight * cls_loss, each stream clipped on its own
# ---------------------------------------------------------------------------------------------

# -- what an update logs ----------------------------------------------------------------------

CHECKED = ("pg_loss", "cls_loss", "kl", "grad_norm", "cls_grad_norm")  # NaN or inf in any stops a run
CLIP_KEYS = ("cls_grad_norm", "cls_grad_clipped", "cls_pg_grad_ratio", "joint_clip_pg_scale",
             "adam_pg_step_scale")  # clip_stats, adam_pg_step_scale


def opt_step_stats(t: dict, cfg: Config, m, logp_old, flawed, y) -> dict:
    """What one optimizer step logs, as device tensors (no host sync inside the update loop)."""
    p = t["logp_all"].exp()
    s = {"pg_loss": t["pg_loss"].detach(), "kl": t["kl"].detach(), "cls_loss": t["cls_loss"].detach(),
         "entropy": -(p * t["logp_all"]).masked_fill(~m, 0).sum(1).mean().detach(),
         "clip_frac": ((t["logp"] - logp_old).exp().sub(1).abs() > cfg.epsilon).float().mean().detach(),
         "pg_grad_norm": t["grad_norm"], "grad_clipped": (t["grad_norm"] > cfg.max_grad_norm).double(),
         "finite": torch.stack([torch.isfinite(t[k]).all() for k in CHECKED])}
    if t.get("side"):  # a side share this step: its gradient beside the pg's
        s |= {k: t[k].double() for k in CLIP_KEYS if t.get(k) is not None} | {"side": True}
    if t["c"] is not None:  # the classifier's verdict (c > 0 means bad) against its labels and the oracle
        said_bad = t["c"].detach() > 0
        s |= {"cls_correct": (said_bad == (y > 0)).sum(), "oracle_correct": (said_bad == flawed).sum(),
              "classified": torch.tensor(len(y), device=y.device)}
    return s


def update_stats(logs: list[dict], cfg: Config, batch, policy, ref, labelled, n_informative: int) -> dict:
    """Means of the logged terms over the update's optimizer steps, with one host sync. "nonfinite" names
    the first term that was NaN or infinite in the first step that had one (None if all were finite)."""
    out = {"pg_loss": None, "entropy": None, "clip_frac": None, "kl": None, "cls_loss": None, "cls_acc": None,
           "cls_oracle_acc": None, "nonfinite": None, "pg_grad_norm": None, "grad_clipped_frac": None,
           "cos_v_w": None} | {k.replace("clipped", "clipped_frac"): None for k in CLIP_KEYS}
    if logs:  # every group tied: no step was taken
        mean = lambda k: torch.stack([s[k] for s in logs]).mean().item()  # noqa: E731
        out |= {k: mean(k) for k in ("pg_loss", "entropy", "clip_frac", "pg_grad_norm")}
        out["grad_clipped_frac"] = mean("grad_clipped")
        out["kl"] = mean("kl") if ref is not None else None
        finite = torch.stack([s["finite"] for s in logs]).tolist()  # (steps, terms)
        first_bad = next((row for row in finite if not all(row)), None)  # later steps inherit its NaN
        out["nonfinite"] = CHECKED[first_bad.index(False)] if first_bad else None
    counted = [s for s in logs if "side" in s]  # the steps whose side-stream share was not empty
    classified = [s for s in counted if "classified" in s]  # of those, the ones with a classifier verdict
    if classified:
        total = lambda k: torch.stack([s[k] for s in classified]).sum().item()  # noqa: E731
        out["cls_acc"] = total("cls_correct") / total("classified")
        out["cls_oracle_acc"] = total("oracle_correct") / total("classified") if batch["has_oracle"] else None
    if counted:
        out["cls_loss"] = torch.stack([s["cls_loss"] for s in counted]).mean().item()
        for k in CLIP_KEYS:  # NaN marks a step where a ratio is undefined (its denominator was 0)
            v = torch.stack([s[k] for s in counted if k in s]).nanmean().item() if k in counted[0] else None
            out[k.replace("clipped", "clipped_frac")] = None if v is None or math.isnan(v) else v
    if policy.with_classifier and policy.cls_design == "shared":  # v and w, the two heads that read phi(s, a)
        out["cos_v_w"] = F.cosine_similarity(policy.cls_head.weight, policy.policy_head.weight).item()
    return out | {"cls_labelled_frac": labelled.float().mean().item() if labelled is not None else None,
                  "update_samples": n_informative * cfg.num_iterations, "opt_steps": len(logs)}


def batch_stats(batch, R, A) -> dict:
    """What the rollout and the advantages log: success, flawed rate, and the mean advantage of flawed and
    of good steps (Lemma 3.1 says the first is negative in expectation)."""
    A_steps, flawed = A.cpu().numpy(), batch["flawed"] if batch["has_oracle"] else None
    return {"train_success_rate": float(batch["success"].mean()) if batch["has_success"] else None,
            "train_invalid_rate": float(1 - batch["admissible"].mean()) if batch["has_mask"] else None,
            "train_flawed_rate": float(flawed.mean()) if flawed is not None else None,
            "adv_flawed_mean": float(A_steps[flawed].mean()) if flawed is not None and flawed.any() else None,
            "adv_good_mean": float(A_steps[~flawed].mean()) if flawed is not None and (~flawed).any()
            else None,
            "zero_std_frac": float((R.std(dim=1) == 0).float().mean())}


def varied_groups(R: np.ndarray, G: int) -> np.ndarray:
    """R (N,) one reward per trajectory -> (K,) True for the groups whose rewards are not all equal."""
    R = R.reshape(-1, G)                                                      # (K, G)
    return (R != R[:, :1]).any(axis=1)


def informative_steps(batch, G: int) -> np.ndarray:
    """(S',) indices of the step samples of groups whose outcome rewards differ. A group that ties gets
    A = 0 from GRPO, so its steps carry no policy gradient and are skipped (as DAPO drops such groups).
    The rule reads the outcome rewards only, so it is the same in every arm."""
    return np.flatnonzero(varied_groups(batch["reward"], G)[batch["traj"] // G])


def shaping_steps(batch, G: int) -> np.ndarray:
    """The steps of groups whose outcomes tie but whose shaped rewards differ: what --shaping adds where
    the outcome reward carries nothing. They are the shaping arm's side stream, as the labelled steps
    are the classifier's."""
    only = varied_groups(batch["shaped_reward"], G) & ~varied_groups(batch["reward"], G)
    return np.flatnonzero(only[batch["traj"] // G])


def policy_terms(policy, ref, cfg: Config, x, m, a, logp_old, A) -> dict:
    """pg_loss and kl on a minibatch of b step samples: x (b, L), m (b, n_act), a, logp_old, A (b,)."""
    logits, _, _ = policy(x, m)
    logp_all = torch.log_softmax(logits, dim=-1)                              # (b, n_act)
    logp = logp_all.gather(1, a[:, None]).squeeze(1)                          # (b,)
    kl = torch.zeros((), device=x.device)
    if ref is not None:
        with torch.no_grad():
            logp_ref = torch.log_softmax(ref(x, m)[0], dim=-1).gather(1, a[:, None]).squeeze(1)
        kl = kl_k3(logp, logp_ref).mean()
    return {"pg_loss": clipped_surrogate(logp, logp_old, A, cfg.epsilon).mean(), "kl": kl,
            "logp_all": logp_all, "logp": logp}


def classifier_verdict(policy, x, m, a):
    """c(s, a) (b,), the classifier's logit that the taken action a is bad: x (b, L), m (b, n_act), a (b,)."""
    if policy.cls_design == "shared":
        return policy(x, m)[2].gather(1, a[:, None]).squeeze(1)
    return policy.classify_separately(x, a)


def total_norm(grads: list) -> torch.Tensor:
    """The joint L2 norm of a list of gradients (None = no gradient), in float64: a fixed-order sum of the
    tensors' squared norms. A tensor of zeros anywhere in the list adds exactly 0.0, so it cannot move the
    norm by a bit on any CPU. (torch's clip_grad_norm_ reduces the list's norms in one vectorised call,
    whose rounding depends on the list's length and the CPU's vector width: test_total_norm_*.)"""
    present = [g for g in grads if g is not None]
    total = torch.zeros((), dtype=torch.float64, device=present[0].device if present else None)
    for g in present:
        total = total + g.double().square().sum()
    return total.sqrt()


def clip_to_norm(grads: list, max_norm: float) -> tuple[list, torch.Tensor]:
    """grads scaled by min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_ scales them; returns
    (the scaled grads, the norm before)."""
    norm = total_norm(grads)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
    return [None if g is None else g * scale for g in grads], norm


def add_grads(a: list, b: list) -> list:
    """Elementwise a + b over two gradient lists; None is no gradient."""
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def placebo_labels(y, labelled, gen):
    """--cls-channel placebo: the labels y (B,) permuted among the labelled steps, with `gen`. The share
    labelled bad is kept exactly; which step carries which label is independent of the step."""
    idx = torch.nonzero(labelled).squeeze(1)
    shuffled = y.clone()
    shuffled[idx] = y[idx[torch.randperm(len(idx), device=y.device, generator=gen)]]
    return shuffled


def labels_through_policy(policy, cfg: Config, x, m, a, logp_old, y, labelled):
    """--cls-channel policy, on one piece of the side stream: the clipped surrogate with the label as
    the advantage, +1 for a good step and -1 for a bad one, averaged over the labelled steps."""
    logp = torch.log_softmax(policy(x, m)[0], -1).gather(1, a[:, None]).squeeze(1)        # (b,)
    per_sample = clipped_surrogate(logp, logp_old, 1 - 2 * y.float(), cfg.epsilon)
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)


def classifier_stream(policy, cfg: Config, x, m, a, logp_old, y, labelled, jdx, params: list) -> tuple:
    """The side stream's term on its share jdx (b',) of labelled steps, in pieces of minibatch_size samples,
    so that peak memory is one minibatch's however large b' grows (the last piece is padded with a repeat
    that carries no weight: every piece has one shape, and glibc's heap then does not fragment and climb).
    The term is the classifier's loss, or with --cls-channel policy the labels' policy-gradient term.
    Returns the verdicts c (b',; None without a classifier loss), cls_loss (the mean over jdx, as one
    forward would give) and the gradient of cls_weight * cls_loss."""
    c, cls_loss, grads = [], torch.zeros((), device=x.device), [None] * len(params)
    for part in jdx.split(cfg.minibatch_size):                                    # (<= minibatch_size,)
        n = len(part)
        real = torch.arange(cfg.minibatch_size, device=x.device) < n            # (minibatch_size,)
        part = torch.cat([part, part[:1].expand(cfg.minibatch_size - n)])  # one shape for every piece
        if cfg.cls_channel == "policy":
            part_loss = labels_through_policy(policy, cfg, x[part], m[part], a[part], logp_old[part], y[part],
                                              labelled[part] & real) * (n / len(jdx))
        else:
            c_part = classifier_verdict(policy, x[part], m[part], a[part])
            part_loss = classification_loss(c_part, y[part], labelled[part] & real) * (n / len(jdx))
            c.append(c_part[:n].detach())
        grads = add_grads(grads, torch.autograd.grad(cfg.cls_weight * part_loss, params, allow_unused=True))
        cls_loss = cls_loss + part_loss.detach()
    return (torch.cat(c) if c else None), cls_loss, grads


def label_quality(y, labelled, flawed) -> dict:
    """The side stream's labels on one batch against the oracle's flawed flag, all (S,): the share of
    steps labelled; among those, how often the label agrees with the oracle; and of "bad", its precision
    (labelled bad and flawed, over labelled bad) and recall (over flawed). None where undefined."""
    bad, flawed = labelled & (y > 0), flawed.bool()
    share = lambda num, den: (num.sum() / den.sum()).item() if den.any() else None  # noqa: E731
    return {"label_agree": share(labelled & (bad == flawed), labelled),
            "label_precision": share(bad & flawed, bad), "label_recall": share(bad & flawed, flawed)}


def ratio_or_nan(num, den):
    """num / den, or NaN where den is 0 (the mean over steps skips it: update_stats)."""
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.full_like(num, float("nan")))


def shared_params(g_pg: list, g_cls: list) -> list[int]:
    """The indices of the parameters that both streams' gradients reach (the trunk and phi's MLP)."""
    return [i for i, (p, c) in enumerate(zip(g_pg, g_cls)) if p is not None and c is not None]


def clip_stats(g_pg: list, g_cls: list, shared: list[int], norm_pg, norm_cls, max_norm: float) -> dict:
    """What one optimizer step logs of its two gradients, before clipping: each stream's norm and whether
    its clip acted, the classifier's norm over the policy gradient's on the parameters both reach, and the
    factor a single clip of the sum would have put on the policy gradient, relative to its own clip."""
    own = (max_norm / (norm_pg + 1e-6)).clamp(max=1.0)
    joint = (max_norm / (total_norm(add_grads(g_pg, g_cls)) + 1e-6)).clamp(max=1.0)
    ratio = ratio_or_nan(total_norm([g_cls[i] for i in shared]), total_norm([g_pg[i] for i in shared]))
    return {"cls_grad_norm": norm_cls, "cls_grad_clipped": norm_cls > max_norm, "cls_pg_grad_ratio": ratio,
            "joint_clip_pg_scale": joint / own}


def adam_pg_step_scale(opt, params: list, g_pg: list, shared: list[int]):
    """How far Adam moves the (clipped) policy gradient g_pg on the shared parameters, relative to an Adam
    whose second moment had seen the policy gradient alone: ||g_pg / (sqrt(v_hat) + eps)|| over the same
    with v_pg_hat. Adam's own v averages the squares of the summed gradient; v_pg, the same average of
    g_pg's squares, is kept beside it in the optimizer's state (so a checkpoint holds it). Called after
    opt.step() of every optimizer step, so that v_pg advances with v; 1 means the classifier leaves the
    step's size alone, 0.5 that it halves it. None for an optimizer without second moments, or a step
    with no classifier share (shared = [])."""
    mine, alone = [], []
    for i, g in enumerate(g_pg):
        state = opt.state[params[i]]
        if g is None or "exp_avg_sq" not in state:
            continue
        beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
        v_pg = state.setdefault("pg_exp_avg_sq", torch.zeros_like(state["exp_avg_sq"]))
        v_pg.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if i in shared:
            correction = 1 - beta2 ** float(state["step"])
            mine.append(g / ((state["exp_avg_sq"] / correction).sqrt() + eps))
            alone.append(g / ((v_pg / correction).sqrt() + eps))
    return ratio_or_nan(total_norm(mine), total_norm(alone)) if mine else None


def grpo_update(policy, ref, opt, cfg: Config, batch, A, labels, gen, device, cls_gen=None,
                label_gen=None) -> dict:
    """num_iterations epochs of minibatch steps on the batch. A (S,) is each step sample's advantage;
    labels the side stream's (y, labelled), classifier_labels(cfg, batch, A) when None.

    The policy-gradient stream takes the informative steps (informative_steps) in minibatches drawn
    with `gen`, exactly as plain GRPO does. Side streams, drawn with their own generator `cls_gen`, are
    spread over the same optimizer steps: the classifier's labelled steps, and with --shaping the steps
    of groups that only the shaped reward separates (shaping_steps), which join the policy-gradient
    minibatches. Neither changes the plain samples, their order or the number of steps. Each stream's
    gradient is clipped to max_grad_norm on its own and the two are summed into one Adam step, so the
    classifier never shrinks the policy gradient through the clip (test_fair_update_*). The placebo's
    permutation is drawn with a third generator, `label_gen`, so that it takes the classifier's very
    steps. Returns the mean of each logged term and the counts of update_stats()."""
    x, m = torch.as_tensor(batch["tokens"], device=device), torch.as_tensor(batch["mask"], device=device)
    a, logp_old = (torch.as_tensor(batch[k], device=device) for k in ("action", "logp"))
    flawed = torch.as_tensor(batch["flawed"], device=device)
    params = list(policy.parameters())
    pg_idx = torch.as_tensor(informative_steps(batch, cfg.num_generations), device=device)     # (S_pg,)
    cls_gen = cls_gen or torch.Generator(device=device).manual_seed(cfg.seed + 1)
    shaped_idx = torch.as_tensor(shaping_steps(batch, cfg.num_generations) if cfg.shaping != "none"
                                 else np.zeros(0, dtype=np.int64), device=device)              # (S_shaped,)
    side, y, labelled, quality = policy.with_classifier, None, None, {}  # a side stream on labelled steps
    if side:
        y, labelled = labels if labels is not None else classifier_labels(cfg, batch, A, device)
        if cfg.cls_channel == "placebo":
            label_gen = label_gen or torch.Generator(device=device).manual_seed(cfg.seed + 2)
            y = placebo_labels(y, labelled, label_gen)
        cls_idx = torch.nonzero(labelled).squeeze(1)                                           # (S_cls,)
        quality = label_quality(y, labelled, flawed) if batch["has_oracle"] else {}
    if len(pg_idx) == 0:  # every outcome tied: nothing to learn, no step taken
        return update_stats([], cfg, batch, policy, ref, labelled, n_informative=0) | quality
    logs = []
    for _ in range(cfg.num_iterations):
        order = torch.randperm(len(pg_idx), device=device, generator=gen)
        pg_batches = pg_idx[order].split(cfg.minibatch_size)
        if len(shaped_idx):  # the shaped-only steps, in as many parts, join the policy-gradient minibatches
            order = torch.randperm(len(shaped_idx), device=device, generator=cls_gen)
            parts = shaped_idx[order].tensor_split(len(pg_batches))
            pg_batches = [torch.cat(p) for p in zip(pg_batches, parts)]
        cls_batches = [None] * len(pg_batches)
        if side:  # the labelled steps, in as many shares as the policy stream has minibatches
            order = torch.randperm(len(cls_idx), device=device, generator=cls_gen)
            cls_batches = cls_idx[order].tensor_split(len(pg_batches))
        for idx, jdx in zip(pg_batches, cls_batches):                      # (b,) and (b',) sample indices
            t = policy_terms(policy, ref, cfg, x[idx], m[idx], a[idx], logp_old[idx], A[idx])
            g_pg = torch.autograd.grad(t["pg_loss"] + cfg.beta * t["kl"], params, allow_unused=True)
            g_pg_clipped, t["grad_norm"] = clip_to_norm(g_pg, cfg.max_grad_norm)
            grads, t["c"], t["cls_loss"] = g_pg_clipped, None, torch.zeros((), device=device)
            t["cls_grad_norm"], shared = torch.zeros((), device=device), []
            if jdx is not None and len(jdx):
                t["c"], t["cls_loss"], g_cls = classifier_stream(policy, cfg, x, m, a, logp_old, y, labelled,
                                                                 jdx, params)
                g_cls_clipped, norm_cls = clip_to_norm(g_cls, cfg.max_grad_norm)
                grads = add_grads(grads, g_cls_clipped)
                shared = shared_params(g_pg, g_cls)
                t |= clip_stats(g_pg, g_cls, shared, t["grad_norm"], norm_cls, cfg.max_grad_norm)
                t["side"] = True
            for p, grad in zip(params, grads):  # clip(grad(pg_loss + beta * kl)) + clip(grad(w * cls_loss))
                p.grad = grad
            opt.step()
            if side:  # every step: the shadow second moment keeps pace with Adam's own
                t["adam_pg_step_scale"] = adam_pg_step_scale(opt, params, g_pg_clipped, shared)
            side_flawed, side_y = (flawed[jdx], y[jdx]) if t.get("side") else (None, None)
            logs.append(opt_step_stats(t, cfg, m[idx], logp_old[idx], side_flawed, side_y))
    return update_stats(logs, cfg, batch, policy, ref, labelled, len(pg_idx) + len(shaped_idx)) | quality


# ---------------------------------------------------------------------------------------------
# Diagnostics: coupling at the twin probes, measured on the live policy
# ---------------------------------------------------------------------------------------------

def probe_diagnostics(policy, tok, probes, device, use_mask=True) -> dict:
    """At each twin probe (s1 good for a, s2 flawed for a): pi(a|s2), the cosine of the gradients of
    log pi(a|s1) and log pi(a|s2), and the cosine of the pair embeddings phi(s1, a), phi(s2, a).
    The control: the mean probability at s2 of the *other* flawed actions, which have no good twin
    one token away. Coupling lifts pi(a|s2) against them; a drift of the whole policy moves both."""
    params = [p for n, p in policy.named_parameters() if not n.startswith("cls_")]  # what pi reads
    flawed_prob, grad_cos, embed_cos, action_probs, control_prob = [], [], [], [], []
    for p in probes:
        grads, phis = [], []
        for key in ("good", "flawed"):
            x = torch.as_tensor(tok.encode(p[f"obs_{key}"]), device=device)[None]        # (1, L)
            mask = p[f"mask_{key}"] if use_mask else np.ones_like(p[f"mask_{key}"])
            m = torch.as_tensor(mask.astype(bool), device=device)[None]                  # (1, n_act)
            logits, phi, _ = policy(x, m)
            logp = torch.log_softmax(logits, dim=-1)[0, p["action"]]
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp, params)]))
            phis.append(phi[0, p["action"]].detach())
        flawed_prob.append(logp.exp().item())
        pi = torch.softmax(logits[0], -1).tolist()                          # (n_act,) at the flawed twin
        action_probs.append([round(v, 5) for v in pi])
        others = [b for b in np.flatnonzero(p.get("flawed_at_twin", [])) if b != p["action"]]
        control_prob.append(float(np.mean([pi[b] for b in others])) if others else None)
        grad_cos.append(F.cosine_similarity(grads[0], grads[1], dim=0).item())
        embed_cos.append(F.cosine_similarity(phis[0], phis[1], dim=0).item())
    return {"probe_flawed_prob": float(np.mean(flawed_prob)), "probe_flawed_probs": flawed_prob,
            "grad_cos_twin": float(np.mean(grad_cos)), "grad_cos_twin_each": grad_cos,
            "embed_cos_good_bad": float(np.mean(embed_cos)), "embed_cos_each": embed_cos,
            "probe_action_probs": action_probs,
            "probe_control_probs": control_prob}


def pair_diagnostics(policy, tok, pairs: list, device, use_mask=True, with_grads=False) -> dict:
    """Over P sampled twin pairs (s_good, s_flawed, a), per pair: pi(a|s_good), pi(a|s_flawed), the mean
    pi at s_flawed of the other flawed actions (the control), and the cosine of phi(s_good, a) and
    phi(s_flawed, a). with_grads adds the cosine of the gradients of log pi(a|s_good) and log pi(a|s_flawed),
    the overlap that carries coupling: one backward pass per observation, 2P of them (torch.func.vmap
    over this model's attention backward was 3x slower on the CPU)."""
    obs = [p[k] for p in pairs for k in ("obs_good", "obs_flawed")]
    x = torch.as_tensor(np.stack([tok.encode(o) for o in obs]), device=device)            # (2P, L)
    masks = np.stack([p[k] for p in pairs for k in ("mask_good", "mask_flawed")]).astype(bool)
    m = torch.as_tensor(masks if use_mask else np.ones_like(masks), device=device)        # (2P, n_act)
    a = torch.as_tensor([p["action"] for p in pairs], device=device)                     # (P,)
    with torch.no_grad():
        out = [policy(xc, mc) for xc, mc in zip(x.split(FORWARD_CHUNK), m.split(FORWARD_CHUNK))]
        pi = torch.softmax(torch.cat([o[0] for o in out]), -1).view(len(pairs), 2, -1)   # (P, 2, A)
        phi = torch.cat([o[1] for o in out])                                              # (2P, n_act, d)
        phi = phi.view(len(pairs), 2, *phi.shape[1:])                                     # (P, 2, A, d)
    rows = torch.arange(len(pairs), device=device)
    others = torch.as_tensor(np.stack([p["flawed_at_twin"] for p in pairs]), device=device).clone()
    others[rows, a] = False                                                               # (P, n_act)
    control = (pi[:, 1] * others).sum(1) / others.sum(1).clamp(min=1)
    sig = lambda t: [float(f"{v:.6g}") for v in t.tolist()]  # noqa: E731  (tail probabilities keep digits)
    row = {"pair_good_probs": sig(pi[rows, 0, a]), "pair_flawed_probs": sig(pi[rows, 1, a]),
           "pair_control_probs": [v if n else None for v, n in zip(sig(control), others.sum(1).tolist())],
           "pair_embed_cos": sig(F.cosine_similarity(phi[rows, 0, a], phi[rows, 1, a], dim=-1)),
           "pair_flawed_prob": float(pi[rows, 1, a].mean())}
    if with_grads:
        params = [q for n, q in policy.named_parameters() if not n.startswith("cls_")]  # what pi reads
        grads = []
        for i in range(len(obs)):                                                         # (2P, n_params)
            logp = torch.log_softmax(policy(x[i:i + 1], m[i:i + 1])[0], -1)[0, a[i // 2]]
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp, params)]))
        grads = torch.stack(grads).view(len(pairs), 2, -1)
        row["pair_grad_cos"] = sig(F.cosine_similarity(grads[:, 0], grads[:, 1], dim=-1))
    return row


def evaluate(policy, tok, eval_envs, gen, device, use_mask=True) -> dict:
    """Sampled (not greedy) episodes on fixed tasks 0..n-1: greedy decoding would hide the flawed
    actions that the policy still takes with small probability."""
    n, ours = len(eval_envs), eval_envs[0].unwrapped.spec.id.startswith("grpo_cls/")
    b = rollout(policy, eval_envs, tok, tasks=np.arange(n) if ours else None, seeds=np.arange(n) + 10**6,
                gen=gen, device=device, use_mask=use_mask)
    return {"success": float(b["success"].mean()) if b["has_success"] else None,
            "flawed": float(b["flawed"].mean()) if b["has_oracle"] else None,
            "return": float(b["reward"].mean()), "transcript": b["transcript"]}


# ---------------------------------------------------------------------------------------------
# Cold start: behaviour cloning on a noisy scripted agent (the paper's actor starts from an SFT'd LLM)
# ---------------------------------------------------------------------------------------------

def cold_start(policy, cfg: Config, envs_, tok, rng, gen, device):
    """Clone an agent that plays the env's optimal action, or with chance sft_noise a random
    admissible one. The clone inherits its mistakes: a mediocre start that leaves GRPO work to do."""
    if cfg.sft_steps == 0:
        return
    if not hasattr(envs_[0].unwrapped, "optimal_action"):
        print(f"note: {cfg.env} has no scripted optimal_action(); no cold start", file=sys.stderr)
        return

    def noisy_expert(env, mask):
        if rng.random() < cfg.sft_noise:
            return int(rng.choice(np.flatnonzero(mask)))
        return env.unwrapped.optimal_action()

    n = len(envs_)
    demos = [rollout(policy, envs_, tok, tasks=rng.integers(2**31 - 1, size=n),
                     seeds=rng.integers(2**31 - 1, size=n), gen=gen, device=device, pick=noisy_expert,
                     use_mask=cfg.action_mask == "env")  # unmasked: the clone's softmax spans every action
             for _ in range(2)]  # about 1000 (state, action) demonstrations
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.sft_lr)
    x, m, a = (torch.as_tensor(np.concatenate([d[k] for d in demos]), device=device)
               for k in ("tokens", "mask", "action"))
    for _ in range(cfg.sft_steps):
        idx = torch.randint(len(a), (cfg.minibatch_size,), generator=gen, device=device)
        logits, _, _ = policy(x[idx], m[idx])
        loss = F.cross_entropy(logits, a[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# =============================================================================================
# Plumbing: the run's machinery, not the method. Errors, the envs, evaluation, the run's state,
# its log and checkpoints, Ctrl-C, memory and plots. The loop below calls these by name (build,
# make_envs, Evaluation, RunState, RunLog, ctrl_c_stops_the_run, check_finite, ...): a reader of
# the method can skip to "The loop", trusting each name to do what it says.
# =============================================================================================

# -- errors, and what a row of metrics.jsonl holds --------------------------------------------------

class TrainingError(Exception):
    """A run cannot go on; main() prints the message as one line and exits 2."""


class Interrupted(Exception):
    """Ctrl-C: the run saved a checkpoint and stops; main() exits 130."""


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png", "coupling.png",
             "probe_heatmap.png", "vs_plain.png")
ROW_KEYS = ("train_success_rate", "train_flawed_rate", "train_invalid_rate", "success_rate",
            "ood_success_rate", "flawed_rate", "ood_flawed_rate", "probe_flawed_prob",
            "probe_flawed_probs", "probe_control_probs", "grad_cos_twin", "grad_cos_twin_each",
            "embed_cos_good_bad", "embed_cos_each", "probe_action_probs", "pair_good_probs",
            "pair_flawed_probs", "pair_control_probs", "pair_embed_cos", "pair_grad_cos",
            "pair_flawed_prob", "adv_flawed_mean", "adv_good_mean", "zero_std_frac", "pg_loss", "cls_loss",
            "kl", "entropy", "clip_frac", "cls_acc", "cls_oracle_acc", "cls_labelled_frac", "label_agree",
            "label_precision", "label_recall", "pg_grad_norm",
            "grad_clipped_frac", "cls_grad_norm", "cls_grad_clipped_frac", "cls_pg_grad_ratio",
            "joint_clip_pg_scale", "adam_pg_step_scale", "cos_v_w", "eval_return", "ood_eval_return",
            "update_samples", "opt_steps", "rss_mib", "peak_rss_mib", "time_rollout_s", "time_update_s",
            "time_eval_s", "time_diag_s")


def probes_and_pairs(cfg: Config, env: gym.Env) -> tuple[list, list]:
    """The env's four hand-built twin probes and --twin-pairs sampled pairs (seeded by --seed, so paired
    arms of one seed read the same pairs); [] where the env has none."""
    base = env.unwrapped
    probes = getattr(base, "twin_probes", list)()
    has_pairs = cfg.twin_pairs > 0 and hasattr(base, "twin_pairs")
    pairs = base.twin_pairs(cfg.twin_pairs, seed=cfg.seed) if has_pairs else []
    return probes, pairs


def check_label_source(cfg: Config, env: gym.Env):
    has_oracle = "flawed" in env.reset(seed=0)[1]
    if cfg.cls_labels == "oracle" and cfg.cls_weight > 0 and not has_oracle:
        raise TrainingError(f"--cls-labels oracle (the default) needs info['flawed'], which {cfg.env} does "
                            f"not give; choose --cls-labels advantage, step or loop")
    if cfg.shaping == "oracle" and not has_oracle:
        raise TrainingError(f"--shaping oracle needs info['flawed'], which {cfg.env} does not give")


def check_finite(stats: dict, it: int, cfg: Config):
    """Stop the run, before anything is logged or saved, if a loss term or either stream's gradient was NaN
    or inf."""
    bad = stats.pop("nonfinite")
    if bad:
        raise TrainingError(f"iteration {it}: {bad} is not finite; stopped. "
                            f"The last good checkpoint in {cfg.out} is untouched")


def pick_device(asked: str) -> str:
    """'cuda' or 'cpu': auto takes cuda when torch sees one (Config refuses cuda when it does not)."""
    return "cuda" if asked == "cuda" or (asked == "auto" and torch.cuda.is_available()) else "cpu"


# -- the envs and the run's objects -----------------------------------------------------------------

def is_ours(cfg: Config) -> bool:
    """Our envs take options={"task": k} and split=; any other env is reset from a seed alone."""
    return cfg.env.startswith("grpo_cls/")


def make_envs(cfg: Config, n: int, split: str = "train") -> list[gym.Env]:
    """n copies of the env. Only our envs have a held-out family (a MiniGrid env only where envs.py names
    one); others get [] for split='heldout'."""
    kwargs = json.loads(cfg.env_kwargs) | ({"split": split} if is_ours(cfg) else {})
    if split != "train" and (not is_ours(cfg) or gym.spec(cfg.env).kwargs.get("heldout_id", "") is None):
        return []
    return [gym.make(cfg.env, **kwargs) for _ in range(n)]


def build(cfg: Config):
    """Seeded RNGs, the device, the tokenizer and the policy, from the config alone."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    device = torch.device(pick_device(cfg.device))
    try:
        tok = Tokenizer(make_envs(cfg, 1)[0])
    except ValueError as e:
        raise TrainingError(f"--env {cfg.env}: {e}")
    policy = Policy(len(tok.words), tok.seq_len, tok.action_tokens, cfg.d_model, cfg.n_layers, cfg.n_heads,
                    with_classifier=cfg.cls_weight > 0, cls_design=cfg.cls_design).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    return device, tok, policy, gen, np.random.default_rng(cfg.seed)


# -- evaluation on fixed tasks -------------------------------------------------------------------

class Evaluation:
    """The fixed in-domain and held-out tasks, the twin probes, and a generator reseeded at every call so
    that every evaluation sees the same sampling noise. evaluation(policy, it) -> its metrics."""

    def __init__(self, cfg: Config, tok, device, probes: list, pairs: list):
        self.cfg, self.tok, self.device, self.probes, self.pairs = cfg, tok, device, probes, pairs
        self.use_mask = cfg.action_mask == "env"
        self.envs = {"": make_envs(cfg, cfg.eval_tasks), "ood_": make_envs(cfg, cfg.eval_tasks, "heldout")}
        self.gen = torch.Generator(device=device)

    def __call__(self, policy, it: int) -> dict:
        t0, row = time.perf_counter(), {}
        for prefix, envs_ in self.envs.items():
            if not envs_:
                continue
            self.gen.manual_seed(self.cfg.seed + 7919)
            r = evaluate(policy, self.tok, envs_, self.gen, self.device, self.use_mask)
            row |= {f"{prefix}success_rate": r["success"], f"{prefix}flawed_rate": r["flawed"],
                    f"{prefix}eval_return": r["return"]}
            with open(os.path.join(self.cfg.out, f"episode_{prefix or 'train_'}iter{it:04d}.txt"), "w") as f:
                f.write(r["transcript"] + "\n")
        t1 = time.perf_counter()
        if self.probes:
            row |= probe_diagnostics(policy, self.tok, self.probes, self.device, self.use_mask)
        if self.pairs:  # with the gradient cosines (2P backward passes) at evaluations only
            row |= pair_diagnostics(policy, self.tok, self.pairs, self.device, self.use_mask, with_grads=True)
        return row | {"time_eval_s": round(t1 - t0, 4), "time_diag_s": round(time.perf_counter() - t1, 4)}


# -- the run's state, its log and its checkpoints ---------------------------------------------------

@dataclass
class RunState:
    """Everything a checkpoint holds: enough to continue a run bit for bit."""
    cfg: Config
    policy: nn.Module
    opt: torch.optim.Optimizer
    ref: nn.Module | None
    gen: torch.Generator
    rng: np.random.Generator
    cls_gen: torch.Generator
    label_gen: torch.Generator | None = None  # --cls-channel placebo's permutations
    metrics: list = field(default_factory=list)


HERE = os.path.dirname(os.path.abspath(__file__))
UPDATE_VERSION = 2  # config.json's "update": 2 clips each stream on its own; a run without it had one clip
NOT_COMPARED = ("cls_weight", "cls_labels", "cls_design", "cls_channel", "out", "overwrite", "resume",
                "quiet",
                "no_plots", "baseline", "device", "threads", "twin_pairs")  # where a baseline may differ


def load_baseline(cfg: Config, metrics: list[dict]) -> tuple[str, list[dict]] | None:
    """The stored plain-GRPO run to set beside this classifier run: (its folder, its metrics rows), or None.
    Its config must be this run's but for NOT_COMPARED, and its iteration 0 this run's (the same cold
    start). A stored run that fails either check gets a one-line note saying why; 'auto' is silent only
    where no stored run exists for this env and seed. Missing fields count at their defaults."""
    if cfg.baseline == "none" or cfg.cls_weight == 0 or not metrics:
        return None
    path = (cfg.baseline if cfg.baseline != "auto"
            else os.path.join(HERE, "results", "reference", f"{short_name(cfg.env)}-plain-seed{cfg.seed}"))
    differ = []
    try:
        saved = json.load(open(os.path.join(path, "config.json")))
        rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
        rows[0]
    except (OSError, ValueError, IndexError):
        why = "has no readable config.json and metrics.jsonl"
    else:
        mine = dataclasses.asdict(cfg)
        differ = [k for k in mine if k not in NOT_COMPARED and saved.get(k, getattr(Config, k)) != mine[k]]
        same_start = all(rows[0].get(k) == metrics[0].get(k) for k in ("success_rate", "flawed_rate",
                                                                      "probe_flawed_prob"))
        old = saved.get("update", 1) != UPDATE_VERSION
        if not differ and same_start and not old and saved.get("cls_weight") == 0:
            return path, rows
        why = (f"differs in {', '.join(differ)}" if differ else "is not plain GRPO" if saved.get("cls_weight")
               else "was trained by an older update (one clip on the summed gradient)" if old
               else "starts from another cold start (on another CPU, runs differ in roundoff from "
                    "iteration 0)")
    if cfg.baseline != "auto":
        print(f"note: --baseline {path} {why}; not shown", file=sys.stderr)
    elif os.path.exists(path):  # never silent; make reference remakes the default config's reference only
        remake = "" if differ else "; make reference regenerates it on this machine"
        print(f"note: the stored plain-GRPO run {os.path.relpath(path)} {why}, so it is not shown{remake}",
              file=sys.stderr)
    return None


def summarize(metrics: list[dict], cfg: Config, write: bool = True, baseline=None) -> dict:
    last_eval = next((m for m in reversed(metrics) if m.get("eval_return") is not None), {})
    keys = ("success_rate", "ood_success_rate", "flawed_rate", "ood_flawed_rate", "probe_flawed_prob",
            "grad_cos_twin", "embed_cos_good_bad", "eval_return")
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
    summary = {f"initial_{k}": first.get(k) for k in ("success_rate", "ood_success_rate", "flawed_rate",
                                                      "eval_return")}
    summary |= {"iters": last.get("iter", 0), "env_steps": last.get("env_steps", 0),
                "wall_s": last.get("wall_s", 0)}
    summary |= {k: last_eval.get(k) for k in keys}
    if baseline is not None:  # the same keys, from the stored plain-GRPO run at the same iteration
        path, rows = baseline
        same_it = next((r for r in rows if r["iter"] == last_eval.get("iter")), {})
        summary |= {"baseline": path} | {f"baseline_{k}": same_it.get(k) for k in keys}
    if write:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


class StopFlag:
    """SIGINT handler: the first Ctrl-C asks the loop to stop after the current iteration; a second one
    stops at once (hard)."""

    def __init__(self):
        self.requested = self.hard = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def ctrl_c_stops_the_run():
    """Route Ctrl-C to a StopFlag for the duration (main thread only), and absorb the second one."""
    stop = StopFlag()
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, stop) if main_thread else None
    try:
        yield stop
    except KeyboardInterrupt:
        if not stop.requested:
            raise
        stop.hard = True
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def release_free_memory():
    """glibc keeps freed heap pages, and batches of varying size fragment the heap: without this, RSS
    climbs ~30% over 50 iterations with no leak at all (bench.py measures it). malloc_trim hands the
    free pages back to the OS. A no-op where there is no glibc."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_mib() -> dict:
    """Resident memory now and its peak so far, in MiB (Linux; None elsewhere). A leak is a steady climb."""
    try:
        status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status")
                  if line.startswith(("VmHWM", "VmRSS"))}
        return {"rss_mib": round(status["VmRSS"] / 1024, 1), "peak_rss_mib": round(status["VmHWM"] / 1024, 1)}
    except (OSError, KeyError):
        return {"rss_mib": None, "peak_rss_mib": None}


# fields that fix the model's shape or the meaning of its state: a resume may not change them
SHAPE_FIELDS = ("env", "env_kwargs", "d_model", "n_layers", "n_heads", "tasks_per_iter", "num_generations",
                "cls_design")


def save_checkpoint(run: RunState):
    """Everything needed to continue bit for bit, written atomically: a crash never leaves half a file."""
    path = os.path.join(run.cfg.out, "checkpoint.pt")
    torch.save({"model": run.policy.state_dict(), "optimizer": run.opt.state_dict(),
                "ref": run.ref.state_dict() if run.ref is not None else None,
                "rng": {"numpy": run.rng.bit_generator.state, "torch_gen": run.gen.get_state(),
                        "torch": torch.get_rng_state(), "cls_gen": run.cls_gen.get_state(),
                        "label_gen": run.label_gen.get_state() if run.label_gen is not None else None},
                "iter": run.metrics[-1]["iter"], "metrics": run.metrics,
                "config": dataclasses.asdict(run.cfg), "update": UPDATE_VERSION}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir: str) -> dict:
    """The checkpoint of a run folder, loaded without unpickling arbitrary objects."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise TrainingError(f"no checkpoint at {path}; --resume takes a run folder written by grpo_cls.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"model", "optimizer", "rng", "metrics", "config"} <= set(ckpt)
    except Exception as e:
        raise TrainingError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
                            f"start a new run with --overwrite")
    return ckpt


def restore(ckpt: dict, run: RunState) -> list[dict]:
    """Load a checkpoint into the run's policy, optimizer, reference and RNGs; returns its metric rows."""
    if ckpt["metrics"][-1]["iter"] > 0 and ckpt.get("update", 1) != UPDATE_VERSION:
        raise TrainingError(f"the checkpoint was trained by update {ckpt.get('update', 1)} (one clip on the "
                            f"summed gradient), this code is update {UPDATE_VERSION}; a resumed run would "
                            f"mix the two. Start anew with --overwrite")
    try:
        run.policy.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        if run.ref is not None and ckpt["ref"] is None:
            raise TrainingError("--resume cannot turn on --beta: the checkpoint was trained without a "
                                "reference policy, and its own policy is not the cold start")
        if run.ref is not None:
            run.ref.load_state_dict(ckpt["ref"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainingError(f"checkpoint does not fit this config ({str(e).splitlines()[0][:120]})")
    run.rng.bit_generator.state = ckpt["rng"]["numpy"]
    run.gen.set_state(ckpt["rng"]["torch_gen"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cls_gen" in ckpt["rng"]:  # an iteration-0 checkpoint written before any classifier existed lacks it
        run.cls_gen.set_state(ckpt["rng"]["cls_gen"])
    if ckpt["rng"].get("label_gen") is not None and run.label_gen is not None:  # older ones lack it too
        run.label_gen.set_state(ckpt["rng"]["label_gen"])
    return list(ckpt["metrics"])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plot_vs_plain(metrics: list[dict], plain: list[dict], out: str, plt):
    """vs_plain.png: this run's flawed-action rate and pi(flawed | flawed twin) beside the stored
    plain-GRPO run's, both from the same cold start."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, name in zip(axes, ("train_flawed_rate", "probe_flawed_prob"),
                             ("training flawed-action rate", "pi(flawed action | flawed twin)")):
        for rows, label, style in ((plain, "plain GRPO (stored run)", "--"), (metrics, "this run", "-")):
            pts = [(r["iter"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(*zip(*pts), style, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "vs_plain.png"), dpi=110)
    plt.close(fig)


def plot_probe_heatmap(metrics: list[dict], out: str, plt):
    """The paper's Fig. 3b style: every action's probability at each flawed twin, across iterations."""
    rows = [m for m in metrics if m.get("probe_action_probs")]
    if not rows:
        return
    n_probes = len(rows[0]["probe_action_probs"])
    fig, axes = plt.subplots(1, n_probes, figsize=(3.6 * n_probes, 3.4), squeeze=False)
    for k, ax in enumerate(axes[0]):
        grid = np.array([m["probe_action_probs"][k] for m in rows]).T  # (n_act, iterations)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                       extent=(rows[0]["iter"] - 0.5, rows[-1]["iter"] + 0.5, grid.shape[0] - 0.5, -0.5))
        ax.set_title(f"probe {k}: pi(. | flawed twin)", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("action")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(os.path.join(out, "probe_heatmap.png"), dpi=110)
    plt.close(fig)


def plot_run(metrics: list[dict], out: str, baseline=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(m["iter"], m[key]) for m in metrics if m.get(key) is not None]
        return zip(*pts) if pts else ([], [])

    panels = [
        ("training curves.png", [
            ("success", ["train_success_rate", "success_rate", "ood_success_rate"]),
            ("flawed-action rate", ["train_flawed_rate", "flawed_rate", "ood_flawed_rate"]),
            ("losses", ["pg_loss", "cls_loss", "kl"]),
            ("policy", ["entropy", "clip_frac", "zero_std_frac"])]),
        ("coupling diagnostics coupling.png", [
            ("pi(flawed action | flawed twin)", ["probe_flawed_prob"]),
            ("cosines at the twin probes", ["grad_cos_twin", "embed_cos_good_bad"]),
            ("mean advantage by action kind", ["adv_flawed_mean", "adv_good_mean"]),
            ("classifier accuracy", ["cls_acc", "cls_oracle_acc"])]),
    ]
    for title, axes_spec in panels:
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(4.2 * len(axes_spec), 3.2))
        for ax, (name, keys) in zip(axes, axes_spec):
            for key in keys:
                x, y = series(key)
                ax.plot(list(x), list(y), marker="." if key in ("success_rate", "ood_success_rate") else None,
                        label=key)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("iteration")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, title.split()[-1]), dpi=110)
        plt.close(fig)
    plot_probe_heatmap(metrics, out, plt)
    if baseline is not None:
        plot_vs_plain(metrics, baseline[1], out, plt)


class RunLog:
    """The run folder's metrics.jsonl, config.json and checkpoint, the progress bar and the phase clocks.
    A context manager: the files and the bar are closed however the run ends."""

    def __init__(self, run: RunState, checkpoint: dict | None):
        self.run, self.cfg, self.ckpt = run, run.cfg, checkpoint
        self.file = self.bar = self.saved = None
        self.times: dict = {}
        os.makedirs(self.cfg.out, exist_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in (self.file, self.bar):
            if handle is not None:
                handle.close()

    def begin(self, checkpoint: dict | None, first_row):
        """Restore the checkpoint, or log iteration 0 (the cold-started policy) and save it."""
        run, cfg = self.run, self.cfg
        if checkpoint is not None:
            run.metrics = restore(checkpoint, run)
        device = next(run.policy.parameters()).device
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"torch": torch.__version__, "numpy": np.__version__,
                                                 "gymnasium": gym.__version__, "device": str(device),
                                                 "threads": torch.get_num_threads(),
                                                 "update": UPDATE_VERSION}, f, indent=2)
        self.file = open(os.path.join(cfg.out, "metrics.jsonl"), "w")
        for row in run.metrics:  # a resumed run rewrites the rows up to its checkpoint, dropping any after it
            self.file.write(json.dumps(row) + "\n")
        self.t0 = time.time() - (run.metrics[-1]["wall_s"] if run.metrics else 0)
        if os.path.exists(os.path.join(cfg.out, "summary.json")):
            os.remove(os.path.join(cfg.out, "summary.json"))  # this run has not finished yet
        if not run.metrics:
            self.append({"iter": 0, "env_steps": 0} | {k: None for k in ROW_KEYS} | first_row())
        if not run.metrics or not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
            self.checkpoint()  # iteration 0, or a start from another folder's checkpoint (compare.py)
        self.saved = run.metrics[-1]["iter"]

    def iterations(self, stop):
        """The iterations still to run, with a progress bar; stops early when Ctrl-C asked to."""
        start = self.run.metrics[-1]["iter"] + 1
        self.bar = tqdm(total=self.cfg.iters, initial=start - 1, disable=self.cfg.quiet, desc="grpo",
                        unit="it", dynamic_ncols=True)
        for it in range(start, self.cfg.iters + 1):
            if stop.requested:
                return
            yield it
            last = self.run.metrics[-1]
            self.bar.update()
            self.bar.set_postfix(success=fmt(last["train_success_rate"], 2),
                                 flawed=fmt(last["train_flawed_rate"]))

    @contextlib.contextmanager
    def timer(self, phase: str):
        t0 = time.perf_counter()
        yield
        if phase == "update":
            release_free_memory()
        self.times[f"time_{phase}_s"] = round(time.perf_counter() - t0, 4)

    def write(self, it: int, batch, R, A, stats: dict):
        """One iteration's row: the batch, the update's terms, the clocks and the memory."""
        env_steps = self.run.metrics[-1]["env_steps"] + len(batch["action"])
        self.append({k: None for k in ROW_KEYS} | {"iter": it, "env_steps": env_steps}
                    | batch_stats(batch, R, A) | stats | self.times | memory_mib())
        self.times = {}

    def append(self, row: dict):
        row["wall_s"] = round(time.time() - self.t0, 3)
        self.run.metrics.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def checkpoint(self):
        save_checkpoint(self.run)
        self.saved = self.run.metrics[-1]["iter"]

    def finish(self, stop) -> dict:
        """The summary and the plots; after a first Ctrl-C, the last iteration checkpointed before them,
        and Interrupted. summary.json is written only by a run that reached --iters (compare.py reads
        it as "finished")."""
        cfg, metrics = self.cfg, self.run.metrics
        stopped = stop.requested and metrics[-1]["iter"] < cfg.iters
        if self.saved != metrics[-1]["iter"]:
            self.checkpoint()
        baseline = load_baseline(cfg, metrics)
        summary = summarize(metrics, cfg, write=not stopped, baseline=baseline)
        if not cfg.no_plots:
            plot_run(metrics, cfg.out, baseline)
        if stopped:
            raise Interrupted(f"interrupted after iteration {metrics[-1]['iter']}; resume with: "
                              f"python grpo_cls.py --resume {cfg.out}")
        return summary

    def hard_stop_message(self) -> str:
        if self.saved is None:
            return "stopped before the first checkpoint; nothing to resume"
        return (f"stopped at once; the checkpoint of iteration {self.saved} is intact; resume with: "
                f"python grpo_cls.py --resume {self.cfg.out}")


# ---------------------------------------------------------------------------------------------
# The loop: train(cfg), five numbered phases; every name it calls is defined above
# ---------------------------------------------------------------------------------------------

def group_instances(cfg: Config, rng) -> tuple[np.ndarray | None, np.ndarray]:
    """K tasks, each played G times: (tasks, seeds) for the K*G envs. Our envs take the task as an option
    and give each member its own noise; any other env is reset from a seed alone, shared by the group."""
    K, G = cfg.tasks_per_iter, cfg.num_generations
    task_seeds = rng.integers(2**31 - 1, size=K)
    if is_ours(cfg):
        return np.repeat(task_seeds, G), rng.integers(2**31 - 1, size=K * G)
    return None, np.repeat(task_seeds, G)


def train(cfg: Config, checkpoint: dict | None = None) -> dict:
    """The whole run, or its continuation from `checkpoint`. Returns the summary; writes the run folder."""
    device, tok, policy, gen, rng = build(cfg)
    K, G = cfg.tasks_per_iter, cfg.num_generations
    train_envs = make_envs(cfg, K * G)
    evaluation = Evaluation(cfg, tok, device, *probes_and_pairs(cfg, train_envs[0]))
    check_label_source(cfg, train_envs[0])
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    cls_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # the classifier's own sample stream
    label_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)  # the placebo's permutations
    run = RunState(cfg, policy, opt, ref=None, gen=gen, rng=rng, cls_gen=cls_gen, label_gen=label_gen)
    with ctrl_c_stops_the_run() as stop, RunLog(run, checkpoint) as log:
        if checkpoint is None:
            cold_start(policy, cfg, train_envs, tok, rng, gen, device)
        run.ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None  # pi_ref
        log.begin(checkpoint, first_row=lambda: evaluation(policy, 0))  # resume, or log iteration 0
        for it in log.iterations(stop):
            # 1. rollout: G trajectories from identical initial states of each of K tasks
            with log.timer("rollout"):
                batch = rollout(policy, train_envs, tok, *group_instances(cfg, rng), gen, device,
                                use_mask=cfg.action_mask == "env",
                                keys=cfg.cls_labels.startswith("loop") or cfg.shaping == "loop")
            # 2. advantages: one reward per trajectory (outcome, or shaped), for every one of its steps;
            #    and the side stream's labels, one per step
            batch["shaped_reward"] = shaped_rewards(cfg, batch)  # (K*G,) the outcome reward, unless --shaping
            R = torch.as_tensor(batch["shaped_reward"], dtype=torch.float32, device=device).view(K, G)
            A_traj = group_advantages(R, cfg.scale_rewards).view(-1)                              # (K*G,)
            A = step_advantages(cfg, batch, A_traj, device)                                       # (S,)
            labels = classifier_labels(cfg, batch, A, device) if cfg.cls_weight > 0 else None   # (y, labelled)
            # 3. update, at a learning rate annealed linearly to 0 over the run
            for group in run.opt.param_groups:
                group["lr"] = cfg.lr * (1 - (it - 1) / cfg.iters if cfg.anneal_lr else 1)
            with log.timer("update"):
                stats = grpo_update(policy, run.ref, run.opt, cfg, batch, A, labels, gen, device, run.cls_gen,
                                    run.label_gen)
            check_finite(stats, it, cfg)  # a NaN stops the run here; the last checkpoint stays as it was
            # 4. evaluation every eval_every iterations; between them, the twin probes and pairs every diag_every
            if it % cfg.eval_every == 0 or it == cfg.iters:
                stats |= evaluation(policy, it)
            elif (evaluation.probes or evaluation.pairs) and it % cfg.diag_every == 0:
                with log.timer("diag"):  # forward passes only: no random stream is touched
                    if evaluation.probes:
                        stats |= probe_diagnostics(policy, tok, evaluation.probes, device, evaluation.use_mask)
                    if evaluation.pairs:
                        stats |= pair_diagnostics(policy, tok, evaluation.pairs, device, evaluation.use_mask)
            # 5. log, and checkpoint at each evaluation and on Ctrl-C
            log.write(it, batch, R, A, stats)
            if it % cfg.eval_every == 0 or it == cfg.iters or stop.requested:
                log.checkpoint()
        return log.finish(stop)
    raise Interrupted(log.hard_stop_message())  # only a second Ctrl-C, which stops at once, gets here


# ---------------------------------------------------------------------------------------------
# Command line: argparse built from the Config fields
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """argparse from the Config fields. With defaults=False, only the flags actually given are set."""
    parser = OneLineParser(prog="grpo_cls.py", description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           argument_default=None if defaults else argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default if defaults else argparse.SUPPRESS
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"], default=default)
        else:
            name = f.type if isinstance(f.type, str) else f.type.__name__
            typ = {"int": int, "float": float, "str": str}[name]
            parser.add_argument(flag, type=typ, default=default, choices=f.metadata["choices"],
                                help=f.metadata["help"])
    return parser


def check_resume(saved: dict, given: dict):
    """What --resume may not change: the model's shape, and the length an annealed learning rate follows."""
    changed = [k for k in SHAPE_FIELDS if k in given and given[k] != saved[k]]
    if changed:
        raise TrainingError(f"--resume cannot change {', '.join(changed)}: the checkpoint was trained with "
                            + ", ".join(f"{k}={saved[k]!r}" for k in changed))
    anneal = given.get("anneal_lr", saved.get("anneal_lr", 1))
    if "iters" in given and given["iters"] != saved["iters"] and anneal:
        raise TrainingError(f"--resume cannot change --iters ({saved['iters']} -> {given['iters']}) while "
                            f"the learning rate anneals over them; resume with --anneal-lr 0, or start anew")


def parse_args(argv=None) -> tuple[Config, dict | None]:
    """The config, and the checkpoint to continue from when --resume is given."""
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    checkpoint = None
    try:
        if args["resume"]:
            checkpoint = load_checkpoint(args["resume"])
            given = vars(make_parser(defaults=False).parse_args(argv))
            if "env" in given:
                given["env"] = ENV_ALIASES.get(given["env"], given["env"])
            saved = {k: v for k, v in checkpoint["config"].items() if k in args}
            same_json = "env_kwargs" in given and json.loads(given["env_kwargs"] or "null") == json.loads(
                saved["env_kwargs"])
            if same_json:  # '{"a": 1}' and '{"a":1}' are the same kwargs
                given["env_kwargs"] = saved["env_kwargs"]
            saved = {k: getattr(Config, k) for k in args if k in SHAPE_FIELDS} | saved  # older runs lack some
            check_resume(saved, given)
            args = saved | given | {"out": args["resume"], "overwrite": True}
        return Config(**args), checkpoint
    except (ValueError, TrainingError) as e:
        parser.error(str(e))


def print_summary(s: dict, cfg: Config):
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    if cfg.cls_weight > 0 and cfg.cls_labels == "oracle":
        print("oracle labels: the env's own flaw flag, an upper bound a real agent lacks (docs/cure.md)")
    arm = f"cls_weight {cfg.cls_weight:g} ({cfg.cls_labels} labels)" if cfg.cls_weight > 0 else "plain GRPO"
    print(f"{cfg.env} | {arm} | seed {cfg.seed} | {s['iters']} iters, {s['env_steps']} env steps, "
          f"{s['wall_s']:.0f} s")
    print(f"  success       in-domain {f(s['initial_success_rate'])} -> {f(s['success_rate'])}   "
          f"held-out {f(s['initial_ood_success_rate'])} -> {f(s['ood_success_rate'])}")
    print(f"  flawed rate   in-domain {f(s['initial_flawed_rate'])} -> {f(s['flawed_rate'])}   "
          f"held-out {f(s['ood_flawed_rate'])}")
    print(f"  eval return   {f(s['initial_eval_return'])} -> {f(s['eval_return'])}")
    probes = (("pi(flawed) at the twin probes", "probe_flawed_prob"), ("grad cos of the twins", "grad_cos_twin"),
              ("embed cos of the twins", "embed_cos_good_bad"))
    if not s.get("baseline"):
        print("  " + "   ".join(f"{name} {f(s[k])}" for name, k in probes))
    else:  # the same measures, at the same iteration, in the stored plain-GRPO run from the same cold start
        print(f"  beside plain GRPO from the same cold start (the stored run {os.path.relpath(s['baseline'])}; "
              f"vs_plain.png), last evaluation:")
        print(f"  {'':32}{'this run':>10}{'plain GRPO':>12}")
        for name, k in (("flawed rate, in-domain", "flawed_rate"), ("success, in-domain", "success_rate"),
                        ("success, held-out", "ood_success_rate")) + probes:
            print(f"  {name:32}{f(s[k]):>10}{f(s['baseline_' + k]):>12}")
    print(f"  run folder    {cfg.out}  (curves.png, coupling.png, metrics.jsonl, episode_*.txt)")

def main(argv=None):
    cfg, checkpoint = parse_args(argv)
    made = not os.path.exists(cfg.out)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        print(f"grpo_cls.py: error: cannot make the run folder --out {cfg.out} ({e.strerror})",
              file=sys.stderr)
        sys.exit(2)
    if checkpoint is None and os.path.isdir(cfg.out) and os.listdir(cfg.out):
        if not cfg.overwrite:
            print(f"grpo_cls.py: error: run folder {cfg.out} is not empty; pass --overwrite, "
                  f"--resume {cfg.out} or another --out", file=sys.stderr)
            sys.exit(2)
        for name in os.listdir(cfg.out):  # clear what an earlier run wrote, so no stale file survives
            if name.startswith("episode_") or name in RUN_FILES:
                os.remove(os.path.join(cfg.out, name))
    try:
        summary = train(cfg, checkpoint)
    except TrainingError as e:
        if made and not os.listdir(cfg.out):  # nothing written: leave no empty folder behind
            os.rmdir(cfg.out)
        print(f"grpo_cls.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"grpo_cls.py: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C before the training loop (cold start, first evaluation)
        print("grpo_cls.py: stopped before the first checkpoint; nothing to resume", file=sys.stderr)
        sys.exit(130)
    if not cfg.quiet:
        print_summary(summary, cfg)


if __name__ == "__main__":
    main()

"""GRPO with a good/bad-action classifier, on toy agent tasks: a minimal, runnable reference.

    make run     # plain GRPO, then GRPO + classifier from the same cold start, side by side (make bench times it)
    python grpo_cls.py --cls-weight 0.5                   # one classifier run on the text task

Paper: Liu et al., "Rethinking Reward Miscalibration of GRPO in Agentic RL" / "Gradient Coupling"
(arXiv:2509.23870); its method is GCD, Generative Classification Disentanglement. GRPO: Shao et al.
(arXiv:2402.03300). Multi-turn GRPO as in verl-agent (arXiv:2505.10978). Squeezing effect:
Ren & Sutherland (arXiv:2407.10490).

The objective, per step sample (s, a) of trajectory j in a group of G trajectories of one task:
    A_j      = (R_j - mean(R)) / (std(R) + eps)                      group-relative advantage
    rho      = pi(a|s) / pi_old(a|s)
    pg_loss  = -min(rho * A_j, clip(rho, 1 - epsilon, 1 + epsilon) * A_j)
    kl       = exp(d) - d - 1,  d = log pi_ref(a|s) - log pi(a|s)    (k3 estimator)
    cls_loss = BCE(c(s, a), y(s, a))                                 y = 1 if the action is bad
    loss     = pg_loss + beta * kl + cls_weight * cls_loss
Symbols -> code: G = num_generations, epsilon = clip range, beta = KL weight, R = the outcome reward of a
trajectory (1 on success), A = advantage, y = label (1 = bad), c = the classifier's logit.
The method is everything above the ruler "Plumbing", read top to bottom; the loop, train(), comes after
the plumbing. The research arms (more label sources, channels, shaping, GiGPO) live in studies/arms.py.

Deviations from the paper (docs/method.md gives the reasons):
  1. The actor is a 2-layer transformer, not an LLM; GCD's *generated* verdict becomes a linear
     classifier head on the same (state, action) embedding that the policy's logit reads.
  2. Labels for the classifier come from the env's oracle (default: an upper bound a real agent lacks)
     or the sign of the advantage; the paper does not pin its label source down.
  3. The cold start is behaviour cloning on a noisy scripted agent; the prompt-based correction is omitted.
  4. pg_loss and kl average over the steps of groups whose rewards differ (a tied group has A = 0); the
     classifier averages over its labelled steps, in a stream of its own inside the same optimizer steps,
     so that it never changes what the policy-gradient term sees (grpo_update).
  5. Each stream's gradient is clipped to --max-grad-norm on its own, then the two are summed into one
     Adam step. A TRL or verl user would clip the summed loss once; that clip lets the classifier shrink
     the policy-gradient step (docs/optimizer.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
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

import envs  # registers grpo_cls/LavaGrid-v0, grpo_cls/Kitchen-v0, the MiniGrid rooms and the TextWorld games

ENV_ALIASES = {"grid": "grpo_cls/LavaGrid-v0", "text": "grpo_cls/Kitchen-v0",  # and MiniGrid rooms, TextWorld games
               **{name: f"grpo_cls/{name}" for name in {**envs.MINIGRID_ROOMS, **envs.TEXTWORLD_GAMES}}}
CLS_LABELS = ("oracle", "advantage")  # studies/arms.py adds the label sources built from the agent's view
SCALE_REWARDS = ("group", "batch", "none")
ACTION_MASKS = ("env", "none")


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
    env: str = arg("text", "task: 'text' (Kitchen), 'grid' (LavaGrid), a MiniGrid room in words (MiniGrid-*; "
                   "pip install minigrid==3.2.0), TextWorld-Small-v0 (stored games), or any registered gymnasium id")
    env_kwargs: str = arg("{}", "JSON object of keyword arguments for gymnasium.make")
    seed: int = arg(1, "seed for torch, task sampling, env noise and action sampling")
    iters: int = arg(45, "GRPO iterations (rollout + update)")
    tasks_per_iter: int = arg(16, "task instances per iteration; each is run G times")
    num_generations: int = arg(8, "G, trajectories per task (the group)")
    lr: float = arg(1e-3, "Adam learning rate")
    anneal_lr: int = arg(1, "1 = decay the learning rate linearly to 0 over --iters, 0 = constant", (0, 1))
    epsilon: float = arg(0.2, "PPO clip range epsilon")
    beta: float = arg(0.0, "beta, weight of the k3 KL to the frozen cold-start policy (0 = no reference model)")
    num_iterations: int = arg(1, "update epochs over each batch (TRL's num_iterations)")
    minibatch_size: int = arg(64, "step samples per gradient step")
    scale_rewards: str = arg("group", "advantage scaling: std of the group, of the batch, or none (mean only)",
                             SCALE_REWARDS)
    max_grad_norm: float = arg(1.0, "gradient clipping norm, applied to each stream on its own")
    cls_weight: float = arg(0.0, "weight of the good/bad classification loss (0 = plain GRPO, no classifier)")
    cls_labels: str = arg("oracle", "classifier labels: the env's oracle flag (an upper bound a real agent "
                          "lacks), or the sign of the trajectory's advantage", CLS_LABELS)
    action_mask: str = arg("env", "env: choose among the actions info['action_mask'] allows; none: among all "
                           "(an inadmissible one wastes a step and is flawed, as for an LLM agent)", ACTION_MASKS)
    sft_steps: int = arg(150, "cold start: behaviour-cloning steps on a noisy scripted agent (0 = none)")
    sft_noise: float = arg(0.3, "cold start: chance the scripted agent takes a random admissible action")
    sft_lr: float = arg(2e-3, "cold start: Adam learning rate")
    d_model: int = arg(64, "transformer width d")
    n_layers: int = arg(2, "transformer blocks")
    n_heads: int = arg(4, "attention heads")
    eval_every: int = arg(20, "evaluate every N iterations (and at the last)")
    diag_every: int = arg(2, "read the twin probes and pairs every N iterations")
    twin_pairs: int = arg(64, "sampled twin pairs (seeded by --seed) read with the probes (0 = none)")
    eval_tasks: int = arg(128, "fixed task instances per evaluation split (in-domain and held-out)")
    device: str = arg("auto", "auto picks cuda when available", ("auto", "cpu", "cuda"))
    threads: int = arg(2, "torch CPU threads")
    out: str = arg("", "run folder (default runs/<env>-cls<w>-seed<s>)")
    overwrite: bool = arg(False, "allow writing into a non-empty run folder")
    resume: str = arg("", "continue the run in this folder from its checkpoint (flags given override its config)")
    quiet: bool = arg(False, "no progress bar or summary")
    no_plots: bool = arg(False, "skip the PNGs at the end of the run")
    baseline: str = arg("auto", "a stored plain-GRPO run folder to set beside this run; auto: "
                        "results/reference/<env>-plain-seed<seed> where it fits; none: off")
    vs_plain: bool = arg(False, "plain GRPO first, from the same cold start, into <out>/plain; the two side by side")

    def __post_init__(self):
        """Resolve the env alias and the run folder, and refuse bad values with a one-line ValueError
        (check_env, in the plumbing, judges the env and its keyword arguments by making one)."""
        self.env = ENV_ALIASES.get(self.env, self.env)
        if self.env.startswith("MiniGrid-"):  # any other MiniGrid env: in words, with an oracle, no held-out family
            self.env = envs.register_minigrid(self.env)
        for f in dataclasses.fields(self):  # argparse checks the choices on the command line; this, in code
            if f.metadata["choices"] and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of "
                                 f"{', '.join(map(str, f.metadata['choices']))}, got {getattr(self, f.name)!r}")
        if self.twin_pairs < 0:
            raise ValueError(f"--twin-pairs must be >= 0, got {self.twin_pairs}")
        for name in ("iters", "tasks_per_iter", "num_iterations", "minibatch_size", "eval_every", "diag_every",
                     "eval_tasks", "d_model", "n_layers", "n_heads", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        for name in ("lr", "epsilon", "beta", "max_grad_norm", "cls_weight", "sft_noise", "sft_lr"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise ValueError("--lr must be > 0")
        if self.sft_noise > 1 or self.sft_steps < 0:
            raise ValueError("--sft-noise must be in [0, 1] and --sft-steps >= 0")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --n-heads ({self.n_heads})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use auto or cpu")
        if not self.out:
            self.out = f"runs/{short_name(self.env)}-cls{self.cls_weight:g}-seed{self.seed}"


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
    cell, Text -> one token per character."""

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
# (A is the advantage, everywhere in this file.) An observation arrives as (L,) token ids, <s> first.
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
    """pi(a|s) = softmax_a(w . phi(s, a)) over admissible a, and a good/bad classifier c(s, a) = v . phi(s, a).

    phi(s, a) is the policy's own embedding of the (state, action) pair. Training the classifier on good/bad
    labels moves phi of good and bad pairs apart, which is exactly the representation the policy logit uses."""

    def __init__(self, vocab_size: int, seq_len: int, action_tokens: np.ndarray, d: int, n_layers: int,
                 n_heads: int, with_classifier: bool):
        super().__init__()
        self.with_classifier = with_classifier
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.register_buffer("action_tokens", torch.as_tensor(action_tokens))  # (n_act, k)
        self.act_emb = nn.Embedding(len(action_tokens), d)
        # phi(s, a) = gelu(W_s h + W_a u + W_m (h * u)): a one-layer MLP on [h; u; h*u], split so that
        # only the product term is computed per (state, action) pair
        self.pair_s = nn.Linear(d, d)
        self.pair_a, self.pair_m = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.policy_head = nn.Linear(d, 1)                                   # w
        self.cls_head = nn.Linear(d, 1) if with_classifier else None         # v

    def trunk(self, tokens):  # (B, L) -> (B, L, d)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, L, d)
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
        """tokens (B, L), action_mask (B, n_act) bool -> logits (B, n_act), phi (B, n_act, d), and the
        classifier's logits c (B, n_act), or None without a classifier."""
        phi = self.pair_embedding(self.state_embedding(tokens))
        logits = self.policy_head(phi).squeeze(-1).masked_fill(~action_mask, -1e9)  # (B, n_act)
        cls = self.cls_head(phi).squeeze(-1) if self.with_classifier else None
        return logits, phi, cls


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
# The classifier's labels, one per step sample
# ---------------------------------------------------------------------------------------------

def classifier_labels(cfg: Config, batch, A) -> tuple:
    """(y, labelled) (S,), y = 1 calling a step's action bad: the env's flawed flag ('oracle'), or A < 0 bad,
    A > 0 good, A = 0 unlabelled ('advantage')."""
    if cfg.cls_labels == "oracle":
        flawed = torch.as_tensor(batch["flawed"], device=A.device)
        return flawed.float(), torch.ones_like(flawed, dtype=torch.bool)
    return (A < 0).float(), A != 0


# ---------------------------------------------------------------------------------------------
# Rollout: all K*G envs step in lockstep, one batched forward per step, finished envs masked out
# ---------------------------------------------------------------------------------------------

FORWARD_CHUNK = 64  # studies/bench.py: on a 2-core CPU a forward of 64 samples is ~1.5x faster per sample than 128


@torch.inference_mode()
def rollout(policy, envs_, tok, tasks, seeds, gen, device, max_len=10_000, pick=None, use_mask=True,
            keys=False):
    """Run one episode in every env (env i plays task tasks[i] with seed seeds[i]). Returns a dict of
    step-sample arrays (S = total steps): tokens (S, L), mask (S, n_act) the policy's mask, action, logp, traj,
    flawed, admissible (did the env's own mask allow the action), and per-trajectory arrays (N,): reward,
    success, length, and the first episode's text. With use_mask=False the policy chooses among all actions
    (as an LLM agent does). With keys=True (the lab's labels), key and next_key (S,): what the agent saw
    before and after each step (info["state_key"] where the env gives one, else the observation).
    `pick(env, mask) -> action` replaces the policy (used by the cold start's scripted agent)."""
    N, n_actions = len(envs_), envs_[0].action_space.n
    options = [None] * N if tasks is None else [{"task": int(t)} for t in tasks]
    obs, info = zip(*(e.reset(seed=int(s), options=o) for e, s, o in zip(envs_, seeds, options)))
    all_legal = np.ones(n_actions, dtype=np.int8)  # for envs that give no action_mask, and for use_mask=False
    obs, masks = list(obs), [i.get("action_mask", all_legal) for i in info]
    key = [i.get("state_key", tok.encode(o).tobytes()) if keys else None for o, i in zip(obs, info)]
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
            o, r, term, trunc, step_info = envs_[i].step(act)
            flawed = bool(step_info.get("flawed", False))
            next_key = step_info.get("state_key", tok.encode(o).tobytes()) if keys else None
            allowed = bool(masks[i][act])  # the env's own verdict, whether or not the policy was masked
            sample = {"tokens": x[j], "mask": m[j], "action": act, "logp": logp[j], "traj": i, "flawed": flawed,
                      "reward": r, "admissible": allowed, "key": key[i], "next_key": next_key}
            for k, v in sample.items():
                steps[k].append(v)
            has = {k: seen or k in step_info for k, seen in has.items()}
            if i == 0:
                transcript.append(f"> {tok.action_names[act]}{'   [flawed]' if flawed else ''}\n{o}")
            obs[i], masks[i], key[i] = o, step_info.get("action_mask", all_legal), next_key
            reward[i] += r
            length[i] += 1
            if term or trunc:
                done[i], success[i] = True, bool(step_info.get("success", False))
    batch = {k: np.asarray(v) for k, v in steps.items() if k not in ("key", "next_key")}
    batch["step_reward"] = batch.pop("reward")  # (S,) reward of each step; "reward" below is per trajectory
    batch.update(reward=reward, success=success, length=length, transcript="\n".join(transcript),
                 has_oracle=has["flawed"], has_success=has["success"], has_mask=has["action_mask"],
                 key=steps["key"], next_key=steps["next_key"])
    return batch


# ---------------------------------------------------------------------------------------------
# The update: loss = pg_loss + beta * kl + cls_weight * cls_loss, each stream clipped on its own
# Letters: S = step samples in the batch, b = a minibatch of them, b' = the classifier's share of it.
# ---------------------------------------------------------------------------------------------

def varied_groups(R: np.ndarray, G: int) -> np.ndarray:
    """R (N,) one reward per trajectory -> (K,) True for the groups whose rewards are not all equal."""
    R = R.reshape(-1, G)                                                      # (K, G)
    return (R != R[:, :1]).any(axis=1)


def informative_steps(batch, G: int) -> np.ndarray:
    """(S',) indices of the step samples of groups whose outcome rewards differ. A group that ties gets
    A = 0 from GRPO, so its steps carry no policy gradient and are skipped (as DAPO drops such groups)."""
    return np.flatnonzero(varied_groups(batch["reward"], G)[batch["traj"] // G])


def policy_terms(policy, ref, cfg: Config, x, m, a, logp_old, A) -> dict:
    """pg_loss and kl on a minibatch of b step samples: x (b, L), m (b, n_act), a, logp_old, A (b,); and
    two readings of the policy that the update logs, its entropy and the share of clipped ratios."""
    logits, _, _ = policy(x, m)
    logp_all = torch.log_softmax(logits, dim=-1)                              # (b, n_act)
    logp = logp_all.gather(1, a[:, None]).squeeze(1)                          # (b,)
    kl = torch.zeros((), device=x.device)
    if ref is not None:
        with torch.no_grad():
            logp_ref = torch.log_softmax(ref(x, m)[0], dim=-1).gather(1, a[:, None]).squeeze(1)
        kl = kl_k3(logp, logp_ref).mean()
    p = logp_all.exp()
    return {"pg_loss": clipped_surrogate(logp, logp_old, A, cfg.epsilon).mean(), "kl": kl,
            "entropy": -(p * logp_all).masked_fill(~m, 0).sum(1).mean().detach(),
            "clip_frac": ((logp - logp_old).exp().sub(1).abs() > cfg.epsilon).float().mean().detach()}


def total_norm(grads: list) -> torch.Tensor:
    """The joint L2 norm of a list of gradients (None = no gradient), in float64, summed in a fixed order: a
    tensor of zeros anywhere adds exactly 0.0 on any CPU (torch's clip_grad_norm_ rounds by vector width)."""
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


def classifier_stream(policy, cfg: Config, x, m, a, y, labelled, jdx, params: list) -> tuple:
    """The classifier's term on its share jdx (b',) of the labelled steps, in pieces of minibatch_size samples
    (peak memory is one minibatch's; the last piece is padded with a weightless repeat, so all have one shape).
    Returns the verdicts c (b',), cls_loss (the mean over jdx, as one pass gives), grad(cls_weight * cls_loss)."""
    c, cls_loss, grads = [], torch.zeros((), device=x.device), [None] * len(params)
    for part in jdx.split(cfg.minibatch_size):                                    # (<= minibatch_size,)
        n = len(part)
        real = torch.arange(cfg.minibatch_size, device=x.device) < n            # (minibatch_size,)
        part = torch.cat([part, part[:1].expand(cfg.minibatch_size - n)])  # one shape for every piece
        c_part = policy(x[part], m[part])[2].gather(1, a[part][:, None]).squeeze(1)  # (minibatch_size,) c(s, a)
        part_loss = classification_loss(c_part, y[part], labelled[part] & real) * (n / len(jdx))
        grads = add_grads(grads, torch.autograd.grad(cfg.cls_weight * part_loss, params, allow_unused=True))
        cls_loss = cls_loss + part_loss.detach()
        c.append(c_part[:n].detach())
    return torch.cat(c), cls_loss, grads


def grpo_update(run, batch, A, labels) -> list[dict]:
    """num_iterations epochs of minibatch steps on one batch, with the run's policy, ref, opt and generators;
    returns what each optimizer step logs (update_stats reduces it). A (S,) is each step's advantage; labels
    the classifier's (y, labelled), or None without a classifier.

    The policy-gradient stream takes the informative steps in minibatches drawn with run.gen, exactly as
    plain GRPO does. The labelled steps, drawn with the classifier's own run.cls_gen, are spread over the
    same optimizer steps: they change neither the plain samples, their order, nor the number of steps."""
    policy, cfg, device = run.policy, run.cfg, A.device
    x = torch.as_tensor(batch["tokens"], device=device)                                         # (S, L)
    m = torch.as_tensor(batch["mask"], device=device)                                       # (S, n_act)
    a, logp_old, flawed = (torch.as_tensor(batch[k], device=device) for k in ("action", "logp", "flawed"))  # (S,)
    params = list(policy.parameters())
    pg_idx = torch.as_tensor(informative_steps(batch, cfg.num_generations), device=device)     # (S_pg,)
    logs = []
    for _ in range(cfg.num_iterations if len(pg_idx) else 0):  # every outcome tied: nothing to learn
        order = torch.randperm(len(pg_idx), device=device, generator=run.gen)
        pg_batches = pg_idx[order].split(cfg.minibatch_size)
        cls_batches = [None] * len(pg_batches)
        if labels is not None:  # the labelled steps, in as many shares as the policy stream has minibatches
            cls_idx = torch.nonzero(labels[1]).squeeze(1)                                       # (S_cls,)
            order = torch.randperm(len(cls_idx), device=device, generator=run.cls_gen)
            cls_batches = cls_idx[order].tensor_split(len(pg_batches))
        for idx, jdx in zip(pg_batches, cls_batches):                      # (b,) and (b',) sample indices
            pg = policy_terms(policy, run.ref, cfg, x[idx], m[idx], a[idx], logp_old[idx], A[idx])
            g_pg = torch.autograd.grad(pg["pg_loss"] + cfg.beta * pg["kl"], params, allow_unused=True)
            g_pg, pg_norm = clip_to_norm(g_pg, cfg.max_grad_norm)
            c, g_cls = None, [None] * len(params)
            cls_loss, cls_norm = torch.zeros((), device=device), torch.zeros((), device=device)
            if jdx is not None and len(jdx):
                c, cls_loss, g_cls = classifier_stream(policy, cfg, x, m, a, *labels, jdx, params)
                g_cls, cls_norm = clip_to_norm(g_cls, cfg.max_grad_norm)
            # The paper's loss, pg_loss + beta * kl + cls_weight * cls_loss, as this step's gradient; not one
            # loss.backward(): each stream is clipped on its own (deviation 5), so the classifier never shrinks it.
            grads = add_grads(g_pg, g_cls)  # = clip(grad(pg_loss + beta * kl)) + clip(grad(cls_weight * cls_loss))
            for p, grad in zip(params, grads):
                p.grad = grad
            run.opt.step()
            side = c is not None  # this step had a share of the labelled steps
            logs.append({k: v.detach() for k, v in pg.items()} | {
                "pg_grad_norm": pg_norm, "cls_loss": cls_loss, "cls_grad_norm": cls_norm, "c": c,
                "y": labels[0][jdx] if side else None, "flawed": flawed[jdx] if side else None})
    return logs


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
            "probe_action_probs": action_probs, "probe_control_probs": control_prob}


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


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "cold_start.pt", "curves.png",
             "coupling.png", "probe_heatmap.png", "vs_plain.png")
ROW_KEYS = ("train_success_rate", "train_flawed_rate", "train_invalid_rate", "success_rate",
            "ood_success_rate", "flawed_rate", "ood_flawed_rate", "probe_flawed_prob",
            "probe_flawed_probs", "probe_control_probs", "grad_cos_twin", "grad_cos_twin_each",
            "embed_cos_good_bad", "embed_cos_each", "probe_action_probs", "pair_good_probs",
            "pair_flawed_probs", "pair_control_probs", "pair_embed_cos", "pair_grad_cos",
            "pair_flawed_prob", "adv_flawed_mean", "adv_good_mean", "zero_std_frac", "pg_loss", "cls_loss",
            "kl", "entropy", "clip_frac", "cls_acc", "cls_oracle_acc", "cls_labelled_frac", "pg_grad_norm",
            "grad_clipped_frac", "cos_v_w", "eval_return", "ood_eval_return",
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
                            f"not give; choose --cls-labels advantage")


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


# -- what an update logs --------------------------------------------------------------------------

CHECKED = ("pg_loss", "cls_loss", "kl", "pg_grad_norm", "cls_grad_norm")  # NaN or inf in any stops a run


def update_stats(logs: list[dict], run, batch, labels) -> dict:
    """Means over the update's optimizer steps of what grpo_update logged, with one host sync. "nonfinite"
    names the first term that was NaN or infinite in the first step that had one (None if all were finite).
    The classifier's accuracy counts its verdicts (c > 0 means bad) against its labels and the oracle."""
    cfg, policy = run.cfg, run.policy
    out = {k: None for k in ("pg_loss", "entropy", "clip_frac", "kl", "cls_loss", "cls_acc", "cls_oracle_acc",
                             "nonfinite", "pg_grad_norm", "grad_clipped_frac", "cos_v_w")}
    if logs:  # every group tied: no step was taken
        mean = lambda k: torch.stack([s[k] for s in logs]).mean().item()  # noqa: E731
        out |= {k: mean(k) for k in ("pg_loss", "entropy", "clip_frac", "pg_grad_norm")}
        out["grad_clipped_frac"] = torch.stack([(s["pg_grad_norm"] > cfg.max_grad_norm).double()
                                                for s in logs]).mean().item()
        out["kl"] = mean("kl") if run.ref is not None else None
        finite = torch.stack([torch.stack([torch.isfinite(s[k]).all() for k in CHECKED]) for s in logs])
        first_bad = next((row for row in finite.tolist() if not all(row)), None)  # later steps inherit it
        out["nonfinite"] = CHECKED[first_bad.index(False)] if first_bad else None
    classified = [s for s in logs if s["c"] is not None]  # the steps with a share of the labelled steps
    if classified:
        total = lambda rows: torch.stack(rows).sum().item()  # noqa: E731
        n = total([torch.tensor(len(s["y"]), device=s["y"].device) for s in classified])
        out["cls_acc"] = total([((s["c"] > 0) == (s["y"] > 0)).sum() for s in classified]) / n
        out["cls_oracle_acc"] = (total([((s["c"] > 0) == s["flawed"]).sum() for s in classified]) / n
                                 if batch["has_oracle"] else None)
        out["cls_loss"] = torch.stack([s["cls_loss"] for s in classified]).mean().item()
    if policy.with_classifier:  # v and w, the two heads that read phi(s, a)
        out["cos_v_w"] = F.cosine_similarity(policy.cls_head.weight, policy.policy_head.weight).item()
    n_informative = len(informative_steps(batch, cfg.num_generations))
    return out | {"cls_labelled_frac": labels[1].float().mean().item() if labels is not None else None,
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


# -- the envs and the run's objects -----------------------------------------------------------------

def is_ours(cfg: Config) -> bool:
    """Our envs take options={"task": k} and split=; any other env is reset from a seed alone."""
    return cfg.env.startswith("grpo_cls/")


def check_env(cfg: Config):
    """Refuse, with a one-line ValueError, an env that is not registered or that its keyword arguments do not
    fit: the env's own constructor is their only judge."""
    if cfg.env not in gym.registry:
        raise ValueError(f"--env {cfg.env!r} is not registered; use 'grid', 'text' or a gymnasium id")
    try:
        kwargs = json.loads(cfg.env_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--env-kwargs is not valid JSON ({e.msg}); "
                         f"give an object like '{{\"is_slippery\": false}}'")
    if not isinstance(kwargs, dict):
        raise ValueError(f"--env-kwargs must be a JSON object, got {cfg.env_kwargs!r}")
    try:
        gym.make(cfg.env, **kwargs).close()
    except Exception as e:
        why = str(e).splitlines()[0][:200]
        if kwargs:
            raise ValueError(f"--env-kwargs {cfg.env_kwargs} do not fit {cfg.env}: {why}")
        raise ValueError(f"--env {cfg.env} cannot be made: {why}")


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
        check_env(cfg)
        tok = Tokenizer(make_envs(cfg, 1)[0])
    except ValueError as e:
        raise TrainingError(str(e) if str(e).startswith("--env") else f"--env {cfg.env}: {e}")
    policy = Policy(len(tok.words), tok.seq_len, tok.action_tokens, cfg.d_model, cfg.n_layers, cfg.n_heads,
                    with_classifier=cfg.cls_weight > 0).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    return device, tok, policy, gen, np.random.default_rng(cfg.seed)


# -- evaluation on fixed tasks, and the twin pairs it reads -----------------------------------------

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
        row |= self.twins(policy, with_grads=True)  # the gradient cosines (2P backward passes) at evaluations only
        return row | {"time_eval_s": round(t1 - t0, 4), "time_diag_s": round(time.perf_counter() - t1, 4)}

    def twins(self, policy, with_grads: bool = False) -> dict:
        """The readings at the twin probes and the sampled twin pairs ({} where the env has neither)."""
        row = {}
        if self.probes:
            row |= probe_diagnostics(policy, self.tok, self.probes, self.device, self.use_mask)
        if self.pairs:
            row |= pair_diagnostics(policy, self.tok, self.pairs, self.device, self.use_mask, with_grads)
        return row


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
    cls_gen: torch.Generator  # the classifier's own sample stream
    metrics: list = field(default_factory=list)


def side_generators(run: RunState) -> dict:
    """The run's torch generators other than gen, by field name: cls_gen, and any a study's RunState adds."""
    return {f.name: getattr(run, f.name) for f in dataclasses.fields(run)
            if f.name != "gen" and isinstance(getattr(run, f.name), torch.Generator)}


HERE = os.path.dirname(os.path.abspath(__file__))
# The fields only the lab's runs have (studies/arms.py), at the values that leave this file's method as it
# is. A stored run with another value there was trained by the lab: --resume and --baseline refuse it.
LAB_FIELDS_OFF = {"adv": "grpo", "cls_design": "shared", "cls_channel": "head", "shaping": "none", "pretrain": "none",
                  "cls_placement": "all"}
UPDATE_VERSION = 2  # config.json's "update": 2 clips each stream on its own; a run without it had one clip
NOT_COMPARED = ("cls_weight", "cls_labels", "out", "overwrite", "resume", "quiet", "no_plots", "baseline", "vs_plain",
                "device", "threads", "twin_pairs",  # where a baseline may differ; and what a plain run does not read
                "cls_design", "cls_channel")  # of a lab run's classifier


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
        differ = [k for k in mine if k not in NOT_COMPARED and saved.get(k, getattr(type(cfg), k)) != mine[k]]
        differ += [k for k, off in LAB_FIELDS_OFF.items() if k not in mine and saved.get(k, off) != off]
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


LATE_ITERS = 10  # the paired endpoint (results/PROTOCOL.md): the training batches' flawed rate, last 10 iterations


def late_flawed_rate(rows: list[dict], last_iter: int) -> float | None:
    """The mean training-batch flawed rate over iterations last_iter - 9 .. last_iter (fewer in a shorter run):
    10 * tasks_per_iter * G episodes, where one evaluation reads eval_tasks."""
    rates = [r["train_flawed_rate"] for r in rows if last_iter - LATE_ITERS < r["iter"] <= last_iter
             and r["iter"] > 0 and r.get("train_flawed_rate") is not None]
    return float(np.mean(rates)) if rates else None


def summarize(metrics: list[dict], cfg: Config, write: bool = True, baseline=None) -> dict:
    last_eval = next((m for m in reversed(metrics) if m.get("eval_return") is not None), {})
    keys = ("success_rate", "ood_success_rate", "flawed_rate", "ood_flawed_rate", "probe_flawed_prob",
            "grad_cos_twin", "embed_cos_good_bad", "eval_return")
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
    summary = {f"initial_{k}": first.get(k) for k in ("success_rate", "ood_success_rate", "flawed_rate",
                                                      "ood_flawed_rate", "eval_return")}
    summary |= {"iters": last.get("iter", 0), "env_steps": last.get("env_steps", 0),
                "wall_s": last.get("wall_s", 0)}
    summary |= {k: last_eval.get(k) for k in keys}
    summary["late_train_flawed_rate"] = late_flawed_rate(metrics, summary["iters"])
    if baseline is not None:  # the same keys, from the plain-GRPO run at the same iteration
        path, rows = baseline
        same_it = next((r for r in rows if r["iter"] == last_eval.get("iter")), {})
        summary |= {"baseline": path} | {f"baseline_{k}": same_it.get(k) for k in keys}
        summary["baseline_late_train_flawed_rate"] = late_flawed_rate(rows, summary["iters"])
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
    climbs ~30% over 50 iterations with no leak at all (studies/bench.py measures it). malloc_trim hands the
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
                "cls_design")  # the last, a lab run's


def save_checkpoint(run: RunState):
    """Everything needed to continue bit for bit, written atomically: a crash never leaves half a file."""
    path = os.path.join(run.cfg.out, "checkpoint.pt")
    torch.save({"model": run.policy.state_dict(), "optimizer": run.opt.state_dict(),
                "ref": run.ref.state_dict() if run.ref is not None else None,
                "rng": {"numpy": run.rng.bit_generator.state, "torch_gen": run.gen.get_state(),
                        "torch": torch.get_rng_state(),
                        **{name: g.get_state() for name, g in side_generators(run).items()}},
                "iter": run.metrics[-1]["iter"], "metrics": run.metrics,
                "config": dataclasses.asdict(run.cfg), "update": UPDATE_VERSION}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir: str, name: str = "checkpoint.pt") -> dict:
    """The checkpoint of a run folder (or its cold start, name="cold_start.pt"), loaded without unpickling
    arbitrary objects."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise TrainingError(f"no checkpoint at {path}; --resume takes a run folder written by grpo_cls.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"model", "optimizer", "rng", "metrics", "config"} <= set(ckpt)
    except Exception as e:
        raise TrainingError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
                            f"start a new run with --overwrite")
    return ckpt


def fit_cold_start(init: dict, cfg: Config, policy: nn.Module) -> dict:
    """An iteration-0 checkpoint fitted to another run of the same seed (--vs-plain's classifier run, a lab
    arm): its config, a fresh optimizer (none has stepped yet), and the parameters the cold start never
    touches (the classifier's) at their initial values in `policy`, freshly built for cfg."""
    model = policy.state_dict() | init["model"]
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    ref = model if cfg.beta > 0 else None  # at iteration 0 the policy is the cold start, pi_ref
    return init | {"model": model, "optimizer": opt.state_dict(), "ref": ref, "config": dataclasses.asdict(cfg)}


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
    for name, g in side_generators(run).items():  # an iteration-0 checkpoint of an older run may lack one
        if ckpt["rng"].get(name) is not None:
            g.set_state(ckpt["rng"][name])
    return list(ckpt["metrics"])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plot_vs_plain(metrics: list[dict], plain: list[dict], out: str, plt):
    """vs_plain.png: this run's flawed-action rate and pi(flawed | flawed twin) beside the plain-GRPO
    run's (trained by --vs-plain, or stored), both from the same cold start."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, name in zip(axes, ("train_flawed_rate", "probe_flawed_prob"),
                             ("training flawed-action rate", "pi(flawed action | flawed twin)")):
        for rows, label, style in ((plain, "plain GRPO", "--"), (metrics, "GRPO + classifier", "-")):
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


def keep_cold_start(out: str):
    """cold_start.pt: the iteration-0 checkpoint, kept (as a hard link where the filesystem has them) after
    checkpoint.pt moves on."""
    path = os.path.join(out, "cold_start.pt")
    if os.path.exists(path):
        os.remove(path)
    try:
        os.link(os.path.join(out, "checkpoint.pt"), path)
    except OSError:
        shutil.copyfile(os.path.join(out, "checkpoint.pt"), path)


class RunLog:
    """The run folder's metrics.jsonl, config.json and checkpoint, the progress bar and the phase clocks.
    A context manager: the files and the bar are closed however the run ends."""
    row_keys = ROW_KEYS  # every field of a metrics row, None where an iteration has no value
    resume_with = "python grpo_cls.py --resume"  # what the messages tell a stopped run to run

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
            self.append({"iter": 0, "env_steps": 0} | {k: None for k in self.row_keys} | first_row())
        if not run.metrics or not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
            self.checkpoint()  # iteration 0, or a start from another folder's checkpoint (studies/store.py)
            if checkpoint is None:  # a fresh start keeps its cold start, for a paired run to start from
                keep_cold_start(cfg.out)
        self.saved = run.metrics[-1]["iter"]

    def iterations(self, stop):
        """The iterations still to run, with a progress bar; stops early when Ctrl-C asked to."""
        start = self.run.metrics[-1]["iter"] + 1
        name = "plain GRPO" if self.cfg.cls_weight == 0 else f"GRPO + cls {self.cfg.cls_weight:g}"
        self.bar = tqdm(total=self.cfg.iters, initial=start - 1, disable=self.cfg.quiet, desc=name,
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
        self.append({k: None for k in self.row_keys} | {"iter": it, "env_steps": env_steps}
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
        and Interrupted. summary.json is written only by a run that reached --iters (studies/store.py reads
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
                              f"{self.resume_with} {cfg.out}")
        return summary

    def hard_stop_message(self) -> str:
        if self.saved is None:
            return "stopped before the first checkpoint; nothing to resume"
        return (f"stopped at once; the checkpoint of iteration {self.saved} is intact; resume with: "
                f"{self.resume_with} {self.cfg.out}")


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
    run = RunState(cfg, policy, opt, ref=None, gen=gen, rng=rng, cls_gen=cls_gen)
    with ctrl_c_stops_the_run() as stop, RunLog(run, checkpoint) as log:
        if checkpoint is None:
            cold_start(policy, cfg, train_envs, tok, rng, gen, device)
        run.ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None  # pi_ref
        log.begin(checkpoint, first_row=lambda: evaluation(policy, 0))  # resume, or log iteration 0
        for it in log.iterations(stop):
            # 1. rollout: G trajectories from identical initial states of each of K tasks
            with log.timer("rollout"):
                batch = rollout(policy, train_envs, tok, *group_instances(cfg, rng), gen, device,
                                use_mask=cfg.action_mask == "env")
            # 2. advantages: one outcome reward per trajectory, its advantage given to every one of its steps;
            #    and the classifier's labels, one per step
            R = torch.as_tensor(batch["reward"], dtype=torch.float32, device=device).view(K, G)
            A_traj = group_advantages(R, cfg.scale_rewards).view(-1)                                   # (K*G,)
            A = A_traj[torch.as_tensor(batch["traj"], device=device)]            # (S,) its trajectory's A
            labels = classifier_labels(cfg, batch, A) if cfg.cls_weight > 0 else None   # (y, labelled)
            # 3. update, at a learning rate annealed linearly to 0 over the run
            for group in run.opt.param_groups:
                group["lr"] = cfg.lr * (1 - (it - 1) / cfg.iters if cfg.anneal_lr else 1)
            with log.timer("update"):
                stats = update_stats(grpo_update(run, batch, A, labels), run, batch, labels)
            check_finite(stats, it, cfg)  # a NaN stops the run here; the last checkpoint stays as it was
            # 4. evaluation every eval_every iterations; between them, the twin probes and pairs every diag_every
            if it % cfg.eval_every == 0 or it == cfg.iters:
                stats |= evaluation(policy, it)
            elif (evaluation.probes or evaluation.pairs) and it % cfg.diag_every == 0:
                with log.timer("diag"):  # forward passes only: no random stream is touched
                    stats |= evaluation.twins(policy)
            # 5. log, and checkpoint at each evaluation and on Ctrl-C
            log.write(it, batch, R, A, stats)
            if it % cfg.eval_every == 0 or it == cfg.iters or stop.requested:
                log.checkpoint()
        return log.finish(stop)
    raise Interrupted(log.hard_stop_message())  # only a second Ctrl-C, which stops at once, gets here


def clear_run_folder(out: str):
    """Remove what an earlier run wrote into `out` (made if missing), so that no stale file survives."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("episode_") or name in RUN_FILES:
            os.remove(os.path.join(out, name))


def train_pair(cfg: Config, train_fn=train) -> dict:
    """--vs-plain: plain GRPO first, into <out>/plain, then the classifier run with that run as its baseline.
    The two differ only in cls_weight, so they share the seed, the cold start (computed once), the task
    sequence and the twin pairs; the classifier run's summary then carries both columns and draws vs_plain.png."""
    plain = dataclasses.replace(cfg, cls_weight=0.0, out=os.path.join(cfg.out, "plain"), baseline="none",
                                vs_plain=False)
    clear_run_folder(plain.out)
    train_fn(plain)
    cls = dataclasses.replace(cfg, baseline=plain.out, vs_plain=False)  # a run of its own, resumable as one
    return train_fn(cls, fit_cold_start(load_checkpoint(plain.out, "cold_start.pt"), cls, build(cls)[2]))


# ---------------------------------------------------------------------------------------------
# Command line: argparse built from the Config fields
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(defaults: bool = True, config=Config, prog: str = "grpo_cls.py") -> argparse.ArgumentParser:
    """argparse from the fields of `config` (Config, or a study's extension of it). With defaults=False, only
    the flags actually given are set."""
    parser = OneLineParser(prog=prog, description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           argument_default=None if defaults else argparse.SUPPRESS)
    for f in dataclasses.fields(config):
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


def parse_args(argv=None, config=Config, prog: str = "grpo_cls.py") -> tuple[Config, dict | None]:
    """The config, and the checkpoint to continue from when --resume is given."""
    parser = make_parser(config=config, prog=prog)
    args = vars(parser.parse_args(argv))
    checkpoint = None
    try:
        if args["resume"]:
            checkpoint = load_checkpoint(args["resume"])
            lab = [f"{k}={v!r}" for k, off in LAB_FIELDS_OFF.items() if k not in args
                   and (v := checkpoint["config"].get(k, off)) != off]
            labels = checkpoint["config"].get("cls_labels", "oracle")
            if labels not in config.__dataclass_fields__["cls_labels"].metadata["choices"]:
                lab.append(f"cls_labels={labels!r}")
            if lab:
                raise TrainingError(f"the checkpoint was trained by the lab ({', '.join(lab)}); resume it with "
                                    f"python -m studies.arms --resume {args['resume']}")
            given = vars(make_parser(defaults=False, config=config, prog=prog).parse_args(argv))
            if "env" in given:
                given["env"] = ENV_ALIASES.get(given["env"], given["env"])
            saved = {k: v for k, v in checkpoint["config"].items() if k in args}
            same_json = "env_kwargs" in given and json.loads(given["env_kwargs"] or "null") == json.loads(
                saved["env_kwargs"])
            if same_json:  # '{"a": 1}' and '{"a":1}' are the same kwargs
                given["env_kwargs"] = saved["env_kwargs"]
            saved = {k: getattr(config, k) for k in args if k in SHAPE_FIELDS} | saved  # older runs lack some
            check_resume(saved, given)
            args = saved | given | {"out": args["resume"], "overwrite": True}
        cfg = config(**args)
        check_env(cfg)
        if cfg.vs_plain and (cfg.cls_weight == 0 or checkpoint is not None):
            raise ValueError("--vs-plain needs --cls-weight > 0 and no --resume (resume a pair's runs one by one: "
                             "<out>/plain, then <out>)")
        return cfg, checkpoint
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
          f"held-out {f(s.get('initial_ood_flawed_rate'))} -> {f(s['ood_flawed_rate'])}")
    print(f"  eval return   {f(s['initial_eval_return'])} -> {f(s['eval_return'])}")
    probes = (("pi(flawed) at the twin probes", "probe_flawed_prob"), ("grad cos of the twins", "grad_cos_twin"),
              ("embed cos of the twins", "embed_cos_good_bad"))
    if not s.get("baseline"):
        print("  " + "   ".join(f"{name} {f(s[k])}" for name, k in probes))
    else:  # the same measures, at the same iteration, in the plain-GRPO run from the same cold start
        print(f"  beside plain GRPO from the same cold start ({os.path.relpath(s['baseline'])}; vs_plain.png), "
              f"at the end:")
        print(f"  {'':32}{'GRPO + cls':>12}{'plain GRPO':>12}")
        for name, k in ((f"flawed rate, last {LATE_ITERS} batches", "late_train_flawed_rate"),
                        ("flawed rate, in-domain", "flawed_rate"), ("flawed rate, held-out", "ood_flawed_rate"),
                        ("success, in-domain", "success_rate"), ("success, held-out", "ood_success_rate")) + probes:
            print(f"  {name:32}{f(s.get(k)):>12}{f(s.get('baseline_' + k)):>12}")
        cls, plain = s.get("late_train_flawed_rate"), s.get("baseline_late_train_flawed_rate")
        if cls is not None and plain is not None:
            lower = "the classifier" if cls < plain else "plain GRPO" if plain < cls else "neither (a tie)"
            tally = "; results/demo.md tallies 10 of make run's" if cfg.vs_plain else ""
            print(f"  lower flawed rate in the last {LATE_ITERS} training batches: {lower} "
                  f"(one seed is one draw{tally})")
    print(f"  run folder    {cfg.out}  (curves.png, coupling.png, metrics.jsonl, episode_*.txt)")


def main(argv=None, config=Config, train_fn=train, prog: str = "grpo_cls.py"):
    """The command line. studies/arms.py runs its own Config and trainer through it."""
    cfg, checkpoint = parse_args(argv, config, prog)
    if cfg.vs_plain and train_fn is not train:
        print(f"{prog}: error: --vs-plain pairs grpo_cls.py's own runs; the lab pairs its arms in its matrices",
              file=sys.stderr)
        sys.exit(2)
    made = not os.path.exists(cfg.out)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        print(f"{prog}: error: cannot make the run folder --out {cfg.out} ({e.strerror})", file=sys.stderr)
        sys.exit(2)
    if checkpoint is None and os.path.isdir(cfg.out) and os.listdir(cfg.out):
        if not cfg.overwrite:
            print(f"{prog}: error: run folder {cfg.out} is not empty; pass --overwrite, "
                  f"--resume {cfg.out} or another --out", file=sys.stderr)
            sys.exit(2)
        clear_run_folder(cfg.out)
    try:
        summary = train_pair(cfg, train_fn) if cfg.vs_plain else train_fn(cfg, checkpoint)
    except TrainingError as e:
        if made and not os.listdir(cfg.out):  # nothing written: leave no empty folder behind
            os.rmdir(cfg.out)
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C before the training loop (cold start, first evaluation)
        print(f"{prog}: stopped before the first checkpoint; nothing to resume", file=sys.stderr)
        sys.exit(130)
    if not cfg.quiet:
        print_summary(summary, cfg)


if __name__ == "__main__":
    main()

"""The lab's research arms: GRPO with every variant the studies compare, beside grpo_cls.py's method.

    python -m studies.arms --cls-weight 0.5 --cls-channel placebo    # grpo_cls.py's flags, and the arms'

grpo_cls.py teaches the method; the studies also ask what carries its effect. Their arms live here:
  - more label sources (--cls-labels step | loop | loop-repaired): GiGPO's anchors, or loops in what the
    agent sees, both available to a real agent (the oracle is not);
  - --cls-channel placebo (the classifier on permuted labels: its optimizer effects without the
    information), --cls-channel policy (the same labelled steps as a +-1 advantage on log pi) and
    --cls-channel repel (no labels: training twin pairs' embeddings pushed apart, the representation alone);
  - --shaping oracle | loop: the labels carried by the reward (minus lambda per bad step) instead;
  - --cls-design separate: the classifier reads the action as an input token, as an LLM judge would;
  - --adv gigpo: GiGPO's step-level advantage (arXiv:2505.10978), a baseline for comparison only;
  - --cls-placement high | low: oracle labels only at steps whose observation is a twin of a high- (or
    low-) overlap training pair, as many for each: does a label count for more where twins are coupled?
  - --pretrain mlm: the trunk pretrained without task labels before the cold start, so that twins start
    nearly identical, as near-identical prompts do in a pretrained language model;
  - the update's shadow statistics: each stream's gradient norm and clip, the clip a joint loss would have
    applied (joint_clip_pg_scale), Adam's shared moments (adam_pg_step_scale), and label quality.
The update and the loop repeat grpo_cls.py's in full, with the arms in them: with every arm off they train
bit for bit as grpo_cls.py does (test_studies.py), and results/refactor-check.log compares every arm with the
code from before the two were split.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import grpo_cls as g
from grpo_cls import arg

CLS_LABELS = g.CLS_LABELS + ("step", "loop", "loop-repaired")
CLS_DESIGNS = ("shared", "separate")
CLS_CHANNELS = ("head", "placebo", "policy", "repel")
REPEL_PAIRS = 256  # --cls-channel repel's training twin pairs (training_pairs: none shares a measured observation)
ADVANTAGES = ("grpo", "gigpo")
SHAPING = ("none", "oracle", "loop")
PRETRAIN = ("none", "mlm")
PLACEMENTS = ("all", "high", "low")
PLACEMENT_PAIRS, PLACEMENT_CAP = 1024, 32  # training twin pairs (seed 10_000 + seed); labels kept per batch
COLD_START_FIELDS = ("env", "env_kwargs", "seed", "action_mask", "sft_steps", "sft_noise", "sft_lr", "d_model",
                     "n_layers", "n_heads", "tasks_per_iter", "num_generations", "minibatch_size", "pretrain",
                     "twin_pairs")  # what fixes pi_0, and the measured pairs the training pairs avoid
PRETRAIN_STEPS, PRETRAIN_LR, MASK_SHARE = 300, 2e-3, 0.15  # studies/regime.py measured these on seeds 1-3
ROW_KEYS = g.ROW_KEYS + ("label_agree", "label_precision", "label_recall", "cls_grad_norm", "cls_grad_clipped_frac",
                         "cls_pg_grad_ratio", "joint_clip_pg_scale", "adam_pg_step_scale", "placed_labels",
                         "placement_eligible", "placement_eligible_other")


# ---------------------------------------------------------------------------------------------
# The config: grpo_cls.Config and the arms' fields
# ---------------------------------------------------------------------------------------------

@dataclass
class ArmConfig(g.Config):
    cls_labels: str = arg("oracle", "classifier labels: the env's oracle flag, the sign of the trajectory "
                          "advantage, step-level labels from states that recur within a group, or loops in what "
                          "the agent sees (no progress bad, the loop-erased path of a success good; loop-repaired "
                          "leaves the step that closes a loop unlabelled)", CLS_LABELS)
    adv: str = arg("grpo", "per-step advantage: the trajectory's group advantage (grpo), or that plus omega "
                   "times a step-level advantage within anchor groups of identical states (gigpo)", ADVANTAGES)
    omega: float = arg(1.0, "gigpo: weight omega of the step-level advantage")
    gamma: float = arg(0.95, "discount of the step returns that gigpo and --cls-labels step compare")
    cls_design: str = arg("shared", "classifier: a head on the policy's own pair embedding phi(s, a) (shared), or "
                          "a second pass through the trunk with the action as an extra input token (separate)",
                          CLS_DESIGNS)
    cls_channel: str = arg("head", "what carries the labels, on the same labelled steps: the classifier (head); "
                           "the classifier on labels permuted among each batch's labelled steps (placebo); or "
                           "a policy-gradient term with advantage +1 (good) or -1 (bad) (policy); or no labels at "
                           "all: the twins' pair embeddings pushed apart on training twin pairs (repel)",
                           CLS_CHANNELS)
    shaping: str = arg("none", "reward shaping: the outcome reward minus --shaping-lambda for each step the "
                       "oracle (oracle) or the loop labels (loop) call bad", SHAPING)
    shaping_lambda: float = arg(0.05, "lambda, the reward taken off per step labelled bad (--shaping)")
    cls_placement: str = arg("all", "which labelled steps the side stream keeps: all, or only steps whose "
                             "observation is a twin in a training twin pair of high (or low) overlap at the cold "
                             "start, at most 32 a batch (label placement)", PLACEMENTS)
    pretrain: str = arg("none", "the trunk before the cold start: as initialised (none), or pretrained without task "
                        "labels by masked-token prediction on observations a noisy scripted agent visits (mlm)",
                        PRETRAIN)

    def __post_init__(self):
        """grpo_cls.Config's checks, the arms' own, and the env made once (check_env), as the studies expect."""
        default_out = not self.out
        super().__post_init__()
        for name in ("omega", "gamma", "shaping_lambda"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.gamma > 1:
            raise ValueError(f"--gamma must be in [0, 1], got {self.gamma}")
        if self.cls_channel != "head" and self.cls_weight == 0:
            raise ValueError(f"--cls-channel {self.cls_channel} carries the labels in the side stream: give it "
                             f"--cls-weight > 0")
        if self.cls_placement != "all" and (self.cls_weight == 0 or self.cls_channel == "repel"):
            raise ValueError("--cls-placement places labels: give it --cls-weight > 0 and a channel with labels")
        if self.cls_channel in ("policy", "repel") and self.cls_design != "shared":
            raise ValueError(f"--cls-channel {self.cls_channel} trains no classifier, so it has no --cls-design; "
                             f"leave it shared")
        if self.shaping != "none" and self.cls_weight > 0:
            raise ValueError("--shaping is the classifier's control: use it with --cls-weight 0 (one channel "
                             "at a time)")
        if default_out and self.cls_channel != "head":
            self.out = f"runs/{g.short_name(self.env)}-cls{self.cls_weight:g}-{self.cls_channel}-seed{self.seed}"
        g.check_env(self)


class ArmPolicy(g.Policy):
    """grpo_cls.Policy, and the 'separate' classifier (the ablation): it runs the trunk a second time with
    the action appended as an input token and reads c off that token, as an LLM judge that reads the state
    and the action would. It shapes the shared trunk, but never phi itself."""

    def __init__(self, vocab_size: int, seq_len: int, action_tokens: np.ndarray, d: int, n_layers: int,
                 n_heads: int, with_classifier: bool, cls_design: str = "shared"):
        super().__init__(vocab_size, seq_len, action_tokens, d, n_layers, n_heads, with_classifier)
        self.cls_design = cls_design
        # the action token's own position vector, made last so that every other parameter starts as in plain
        # GRPO (as nn.Embedding, N(0, 1))
        self.cls_pos = nn.Parameter(torch.randn(d)) if with_classifier and cls_design == "separate" else None

    def trunk(self, tokens, extra=None):  # (B, L) [, (B, d) one more input vector] -> (B, L [+1], d)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, L, d)
        if extra is not None:  # padding is a token it learns to ignore
            x = torch.cat([x, (extra + self.cls_pos)[:, None]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens, action_mask):  # the shared classifier's logits only in the shared design
        logits, phi, cls = super().forward(tokens, action_mask)
        return logits, phi, cls if self.cls_design == "shared" else None

    def classify_separately(self, tokens, a):  # (B, L), (B,) -> (B,) c(s, a), the action as an input token
        return self.cls_head(self.trunk(tokens, self.action_embedding()[a])[:, -1]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Advantages and labels per step: GiGPO's anchors, loops in what the agent sees, reward shaping
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


def shaped_rewards(cfg: ArmConfig, batch) -> np.ndarray:
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


def step_advantages(cfg: ArmConfig, batch, A_traj, device):
    """The advantage of every step sample, A (S,). grpo: each step gets its trajectory's advantage.
    gigpo: plus omega * A_S from the step's anchor."""
    A = A_traj[torch.as_tensor(batch["traj"], device=device)]           # (S,)
    if cfg.adv != "gigpo":
        return A
    rtg = step_returns(batch, cfg.gamma)
    A_S = anchor_advantages(batch["traj"], observation_keys(batch), rtg, cfg.num_generations, cfg.scale_rewards)
    return A + cfg.omega * torch.as_tensor(A_S, dtype=A.dtype, device=device)


def classifier_labels(cfg: ArmConfig, batch, A, device) -> tuple:
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


def training_pairs(cfg: ArmConfig, tok, env, n: int, flag: str) -> list[dict]:
    """Twin pairs to train on (repel, label placement): n sampled with seed 10_000 + seed, then the repeats
    dropped and every pair that shares an observation with a measured pair (twin_pairs(cfg.twin_pairs,
    seed)): Kitchen's state space is small, and another seed alone does not keep the two sets apart."""
    if not hasattr(env.unwrapped, "twin_pairs"):
        raise g.TrainingError(f"{flag} needs twin pairs, which {cfg.env} does not sample")
    key = lambda p, k: tok.encode(p[k]).tobytes()  # noqa: E731
    measured = env.unwrapped.twin_pairs(cfg.twin_pairs, seed=cfg.seed) if cfg.twin_pairs else []
    taken = {key(p, k) for p in measured for k in ("obs_good", "obs_flawed")}
    kept, seen = [], set()
    for p in env.unwrapped.twin_pairs(n, seed=10_000 + cfg.seed):
        pair = (key(p, "obs_good"), key(p, "obs_flawed"), int(p["action"]))
        if pair not in seen and not {pair[0], pair[1]} & taken:
            kept.append(p)
        seen.add(pair)
    return kept


def placement_split(cfg: ArmConfig, policy, tok, env, device) -> dict:
    """Label placement's two halves: the training pairs (training_pairs of PLACEMENT_PAIRS) split at the
    median of their overlap (the cosine of the twins' gradients of log pi) under `policy`, which must be the
    cold start. An observation that is a twin in pairs on both sides belongs to neither half. Returns the
    observations (hex of their tokens) of each half, the median, how many observations both halves had,
    and the cold start's fields (what makes a stored split fit a run)."""
    pairs = training_pairs(cfg, tok, env, PLACEMENT_PAIRS, "--cls-placement")
    use_mask = cfg.action_mask == "env"
    overlap = g.pair_diagnostics(policy, tok, pairs, device, use_mask, with_grads=True)["pair_grad_cos"]
    median = float(np.median(overlap))

    def half(keep):
        return {tok.encode(p[k]).tobytes().hex() for p, c in zip(pairs, overlap) if keep(c)
                for k in ("obs_good", "obs_flawed")}
    high, low = half(lambda c: c > median), half(lambda c: c <= median)
    return {"high": sorted(high - low), "low": sorted(low - high), "median": median, "shared": len(high & low),
            "pairs": len(pairs), "cold_start": {k: getattr(cfg, k) for k in COLD_START_FIELDS}}


def placement_keys(cfg: ArmConfig, policy, tok, env, device, at_cold_start: bool) -> tuple[set, set]:
    """The observations of --cls-placement's half and of the other half, from placement.json in the run
    folder, or computed at the cold start and written there (a resumed run reads the split its start made)."""
    path = os.path.join(cfg.out, "placement.json")
    split = json.load(open(path)) if os.path.exists(path) else None
    if split is None or split["cold_start"] != {k: getattr(cfg, k) for k in COLD_START_FIELDS}:
        if not at_cold_start:
            raise g.TrainingError(f"--cls-placement: {path} is missing or from another cold start, and the "
                                  f"policy has left its cold start; start the run anew")
        split = placement_split(cfg, policy, tok, env, device)
        with open(path, "w") as f:
            json.dump(split, f)
    other = "low" if cfg.cls_placement == "high" else "high"
    return tuple({bytes.fromhex(k) for k in split[half]} for half in (cfg.cls_placement, other))


def placed_labels(labels: tuple, batch, keys: tuple[set, set], gen, device) -> tuple:
    """Label placement: of the labelled steps, keep those whose observation is in this arm's half (keys[0]),
    as many as the batch offers in the other half (keys[1]) and at most PLACEMENT_CAP, drawn with `gen`: the
    two arms then never differ in count because one half is rarer in a batch. Returns (y, placed) and the
    eligible counts of both halves."""
    y, labelled = labels
    eligible = [labelled & torch.as_tensor(np.array([t.tobytes() in half for t in batch["tokens"]], dtype=bool),
                                           device=device) for half in keys]
    idx = torch.nonzero(eligible[0]).squeeze(1)
    n = min(PLACEMENT_CAP, len(idx), int(eligible[1].sum()))
    keep = idx[torch.randperm(len(idx), generator=gen, device=device)[:n]]
    placed = torch.zeros_like(labelled)
    placed[keep] = True
    return (y, placed), {"placed_labels": n, "placement_eligible": len(idx),
                         "placement_eligible_other": int(eligible[1].sum())}


def shaping_steps(batch, G: int) -> np.ndarray:
    """The steps of groups whose outcomes tie but whose shaped rewards differ: what --shaping adds where
    the outcome reward carries nothing. They are the shaping arm's side stream, as the labelled steps
    are the classifier's."""
    only = g.varied_groups(batch["shaped_reward"], G) & ~g.varied_groups(batch["reward"], G)
    return np.flatnonzero(only[batch["traj"] // G])


def classifier_verdict(policy, x, m, a):
    """c(s, a) (b,), the classifier's logit that the taken action a is bad: x (b, L), m (b, n_act), a (b,)."""
    if policy.cls_design == "shared":
        return policy(x, m)[2].gather(1, a[:, None]).squeeze(1)
    return policy.classify_separately(x, a)


# ---------------------------------------------------------------------------------------------
# The update with every arm: grpo_cls.grpo_update, plus the shaping steps, the channels and the shadow stats
# ---------------------------------------------------------------------------------------------

CHECKED = ("pg_loss", "cls_loss", "kl", "grad_norm", "cls_grad_norm")  # NaN or inf in any stops a run
CLIP_KEYS = ("cls_grad_norm", "cls_grad_clipped", "cls_pg_grad_ratio", "joint_clip_pg_scale",
             "adam_pg_step_scale")  # clip_stats, adam_pg_step_scale


def opt_step_stats(t: dict, cfg: ArmConfig, flawed, y) -> dict:
    """What one optimizer step logs, as device tensors (no host sync inside the update loop)."""
    s = {"pg_loss": t["pg_loss"].detach(), "kl": t["kl"].detach(), "cls_loss": t["cls_loss"].detach(),
         "entropy": t["entropy"], "clip_frac": t["clip_frac"],
         "pg_grad_norm": t["grad_norm"], "grad_clipped": (t["grad_norm"] > cfg.max_grad_norm).double(),
         "finite": torch.stack([torch.isfinite(t[k]).all() for k in CHECKED])}
    if t.get("side"):  # a side share this step: its gradient beside the pg's
        s |= {k: t[k].double() for k in CLIP_KEYS if t.get(k) is not None} | {"side": True}
    if t["c"] is not None:  # the classifier's verdict (c > 0 means bad) against its labels and the oracle
        said_bad = t["c"].detach() > 0
        s |= {"cls_correct": (said_bad == (y > 0)).sum(), "oracle_correct": (said_bad == flawed).sum(),
              "classified": torch.tensor(len(y), device=y.device)}
    return s


def update_stats(logs: list[dict], cfg: ArmConfig, batch, policy, ref, labelled, n_informative: int) -> dict:
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


def placebo_labels(y, labelled, gen):
    """--cls-channel placebo: the labels y (B,) permuted among the labelled steps, with `gen`. The share
    labelled bad is kept exactly; which step carries which label is independent of the step."""
    idx = torch.nonzero(labelled).squeeze(1)
    shuffled = y.clone()
    shuffled[idx] = y[idx[torch.randperm(len(idx), device=y.device, generator=gen)]]
    return shuffled


def labels_through_policy(policy, cfg: ArmConfig, x, m, a, logp_old, y, labelled):
    """--cls-channel policy, on one piece of the side stream: the clipped surrogate with the label as
    the advantage, +1 for a good step and -1 for a bad one, averaged over the labelled steps."""
    logp = torch.log_softmax(policy(x, m)[0], -1).gather(1, a[:, None]).squeeze(1)        # (b,)
    per_sample = g.clipped_surrogate(logp, logp_old, 1 - 2 * y.float(), cfg.epsilon)
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)


def classifier_stream(policy, cfg: ArmConfig, x, m, a, logp_old, y, labelled, jdx, params: list) -> tuple:
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
            part_loss = g.classification_loss(c_part, y[part], labelled[part] & real) * (n / len(jdx))
            c.append(c_part[:n].detach())
        grads = g.add_grads(grads, torch.autograd.grad(cfg.cls_weight * part_loss, params, allow_unused=True))
        cls_loss = cls_loss + part_loss.detach()
    return (torch.cat(c) if c else None), cls_loss, grads


def repel_pairs(cfg: ArmConfig, tok, env, device) -> dict:
    """--cls-channel repel's training twin pairs (training_pairs of REPEL_PAIRS), fixed by the seed (a resumed
    run rebuilds the same): x (P, 2, L) the good and the flawed twin's tokens, m (P, 2, n_act) their masks,
    a (P,) the action."""
    pairs = training_pairs(cfg, tok, env, REPEL_PAIRS, "--cls-channel repel")
    x = np.stack([[tok.encode(p[k]) for k in ("obs_good", "obs_flawed")] for p in pairs])
    m = np.stack([[p[k] for k in ("mask_good", "mask_flawed")] for p in pairs]).astype(bool)
    m = m if cfg.action_mask == "env" else np.ones_like(m)
    return {"x": torch.as_tensor(x, device=device), "m": torch.as_tensor(m, device=device),
            "a": torch.as_tensor([p["action"] for p in pairs], device=device)}


def twin_repulsion(phi_good, phi_flawed, real):
    """The mean cosine of the twins' pair embeddings over the real rows; (b, d), (b, d), (b,) bool."""
    cos = F.cosine_similarity(phi_good, phi_flawed, dim=-1)
    return (cos * real).sum() / real.sum().clamp(min=1)


def repel_stream(policy, cfg: ArmConfig, pairs: dict, jdx, params: list) -> tuple:
    """--cls-channel repel: the side stream's term on its share jdx (b',) of the training twin pairs, with no
    label: the mean cosine of phi(s_good, a) and phi(s_flawed, a) with their components along the policy
    head w taken out, which the step lowers. Without w's direction the term cannot move the action's logit
    w . phi at either twin directly (nor train w): it separates the twins, not good from bad. In pieces of
    minibatch_size / 2 pairs (one minibatch's observations), padded as classifier_stream's. Returns None (no
    verdicts), the term (the mean over jdx) and the gradient of cls_weight times it."""
    size = max(1, cfg.minibatch_size // 2)
    w = F.normalize(policy.policy_head.weight.detach()[0], dim=0)                                   # (d,)
    off_w = lambda v: v - (v @ w)[:, None] * w  # noqa: E731  (b, d): the part of phi the logit does not read
    loss, grads = torch.zeros((), device=jdx.device), [None] * len(params)
    for part in jdx.split(size):
        n = len(part)
        real = torch.arange(size, device=jdx.device) < n
        part = torch.cat([part, part[:1].expand(size - n)])
        phi = policy(pairs["x"][part].flatten(0, 1), pairs["m"][part].flatten(0, 1))[1]  # (2 size, n_act, d)
        phi = phi.view(size, 2, *phi.shape[1:])
        rows, a = torch.arange(size, device=jdx.device), pairs["a"][part]
        part_loss = twin_repulsion(off_w(phi[rows, 0, a]), off_w(phi[rows, 1, a]), real) * (n / len(jdx))
        grads = g.add_grads(grads, torch.autograd.grad(cfg.cls_weight * part_loss, params, allow_unused=True))
        loss = loss + part_loss.detach()
    return None, loss, grads


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
    joint = (max_norm / (g.total_norm(g.add_grads(g_pg, g_cls)) + 1e-6)).clamp(max=1.0)
    ratio = ratio_or_nan(g.total_norm([g_cls[i] for i in shared]), g.total_norm([g_pg[i] for i in shared]))
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
    for i, grad in enumerate(g_pg):
        state = opt.state[params[i]]
        if grad is None or "exp_avg_sq" not in state:
            continue
        beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
        v_pg = state.setdefault("pg_exp_avg_sq", torch.zeros_like(state["exp_avg_sq"]))
        v_pg.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if i in shared:
            correction = 1 - beta2 ** float(state["step"])
            mine.append(grad / ((state["exp_avg_sq"] / correction).sqrt() + eps))
            alone.append(grad / ((v_pg / correction).sqrt() + eps))
    return ratio_or_nan(g.total_norm(mine), g.total_norm(alone)) if mine else None


def grpo_update(policy, ref, opt, cfg: ArmConfig, batch, A, labels, gen, device, cls_gen=None,
                label_gen=None, pairs: dict | None = None) -> dict:
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
    steps. With --cls-channel repel the side stream's items are the training twin pairs (`pairs`, repel_pairs)
    instead of labelled steps, shared out the same way. Returns the mean of each logged term and the counts of
    update_stats()."""
    x, m = torch.as_tensor(batch["tokens"], device=device), torch.as_tensor(batch["mask"], device=device)
    a, logp_old = (torch.as_tensor(batch[k], device=device) for k in ("action", "logp"))
    flawed = torch.as_tensor(batch["flawed"], device=device)
    params = list(policy.parameters())
    pg_idx = torch.as_tensor(g.informative_steps(batch, cfg.num_generations), device=device)     # (S_pg,)
    cls_gen = cls_gen or torch.Generator(device=device).manual_seed(cfg.seed + 1)
    shaped_idx = torch.as_tensor(shaping_steps(batch, cfg.num_generations) if cfg.shaping != "none"
                                 else np.zeros(0, dtype=np.int64), device=device)              # (S_shaped,)
    side, y, labelled, quality = policy.with_classifier, None, None, {}  # a side stream on labelled steps
    repel = side and cfg.cls_channel == "repel"
    if repel:  # ... or on training twin pairs, with no label
        cls_idx = torch.arange(len(pairs["a"]), device=device)                                   # (P,)
    elif side:
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
            t = g.policy_terms(policy, ref, cfg, x[idx], m[idx], a[idx], logp_old[idx], A[idx])
            g_pg = torch.autograd.grad(t["pg_loss"] + cfg.beta * t["kl"], params, allow_unused=True)
            g_pg_clipped, t["grad_norm"] = g.clip_to_norm(g_pg, cfg.max_grad_norm)
            grads, t["c"], t["cls_loss"] = g_pg_clipped, None, torch.zeros((), device=device)
            t["cls_grad_norm"], shared = torch.zeros((), device=device), []
            if jdx is not None and len(jdx):
                t["c"], t["cls_loss"], g_cls = (repel_stream(policy, cfg, pairs, jdx, params) if repel else
                                                classifier_stream(policy, cfg, x, m, a, logp_old, y, labelled,
                                                                  jdx, params))
                g_cls_clipped, norm_cls = g.clip_to_norm(g_cls, cfg.max_grad_norm)
                grads = g.add_grads(grads, g_cls_clipped)
                shared = shared_params(g_pg, g_cls)
                t |= clip_stats(g_pg, g_cls, shared, t["grad_norm"], norm_cls, cfg.max_grad_norm)
                t["side"] = True
            for p, grad in zip(params, grads):  # clip(grad(pg_loss + beta * kl)) + clip(grad(w * cls_loss))
                p.grad = grad
            opt.step()
            if side:  # every step: the shadow second moment keeps pace with Adam's own
                t["adam_pg_step_scale"] = adam_pg_step_scale(opt, params, g_pg_clipped, shared)
            side_flawed, side_y = (flawed[jdx], y[jdx]) if t.get("side") and not repel else (None, None)
            logs.append(opt_step_stats(t, cfg, side_flawed, side_y))
    return update_stats(logs, cfg, batch, policy, ref, labelled, len(pg_idx) + len(shaped_idx)) | quality


# ---------------------------------------------------------------------------------------------
# The run: grpo_cls.train's loop, with the arms' rewards, advantages, labels and update
# ---------------------------------------------------------------------------------------------

def visited_observations(cfg: g.Config, tok, envs_, rng, gen, device) -> tuple:
    """Tokens (N, L) of the states a noisy scripted agent (chance 0.3 of a random admissible action) visits in
    two rounds over the envs, the next observation's tokens (N, L; zeros after a trajectory's last step), and
    whether there is a next one (N,). No action or label is kept."""
    def noisy_expert(env, mask):
        return int(rng.choice(np.flatnonzero(mask))) if rng.random() < 0.3 else env.unwrapped.optimal_action()
    xs, nxt, has = [], [], []
    driver = g.Policy(len(tok.words), tok.seq_len, tok.action_tokens, cfg.d_model, cfg.n_layers, cfg.n_heads,
                      with_classifier=False).to(device)  # rollout() runs a policy; noisy_expert picks the actions
    for _ in range(2):
        n = len(envs_)
        b = g.rollout(driver, envs_, tok, tasks=rng.integers(2**31 - 1, size=n),
                      seeds=rng.integers(2**31 - 1, size=n), gen=gen, device=device, pick=noisy_expert)
        for j in range(n):
            idx = np.flatnonzero(b["traj"] == j)  # this trajectory's steps, in order
            xs.append(b["tokens"][idx])
            nxt.append(np.concatenate([b["tokens"][idx[1:]], np.zeros_like(b["tokens"][idx[:1]])]))
            has.append(np.arange(len(idx)) < len(idx) - 1)
    return tuple(torch.as_tensor(np.concatenate(v), device=device) for v in (xs, nxt, has))


def pretrain_trunk(policy: g.Policy, cfg: g.Config, tok, envs_, device, objective: str = "mlm",
                   steps: int | None = None) -> list[float]:
    """Pretrain the trunk without task labels, with a head of its own that is dropped after: 'mlm' hides 15%
    of an observation's words (as padding) and predicts them from the trunk's output at their positions;
    'next' predicts the next observation's bag of words from h(s). Its own random streams, seeded by
    cfg.seed: the cold start after it draws exactly what it would without it. Returns the losses."""
    rng = np.random.default_rng(10_000 + cfg.seed)
    gen = torch.Generator(device=device).manual_seed(10_000 + cfg.seed)
    vocab = policy.tok_emb.num_embeddings
    with torch.random.fork_rng(devices=[]):  # the rollout driver's and the head's initial weights: not drawn
        torch.manual_seed(10_000 + cfg.seed)  # from the global stream, which a classifier head moves
        x, x_next, has_next = visited_observations(cfg, tok, envs_, rng, gen, device)
        head = nn.Linear(cfg.d_model, vocab).to(device)
    opt = torch.optim.Adam(list(policy.parameters()) + list(head.parameters()), lr=PRETRAIN_LR)
    rows = torch.arange(len(x), device=device) if objective == "mlm" else torch.nonzero(has_next).squeeze(1)
    losses = []
    for _ in range(steps or PRETRAIN_STEPS):
        idx = rows[torch.randint(len(rows), (cfg.minibatch_size,), generator=gen, device=device)]
        tokens = x[idx]
        if objective == "mlm":
            hide = (tokens > 1) & (torch.rand(tokens.shape, generator=gen, device=device) < MASK_SHARE)
            out = policy.trunk(tokens.masked_fill(hide, 0))  # a hidden word reads as padding
            loss = F.cross_entropy(head(out[hide]), tokens[hide]) if hide.any() else out.sum() * 0
        else:
            target = torch.zeros(len(idx), vocab, device=device).scatter_(1, x_next[idx], 1.0)
            target[:, :2] = 0  # <pad> and <s> are in every observation
            loss = F.binary_cross_entropy_with_logits(head(policy.state_embedding(tokens)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build(cfg: ArmConfig):
    """grpo_cls.build, with ArmPolicy (the separate classifier when the config asks for it)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    device = torch.device(g.pick_device(cfg.device))
    try:
        g.check_env(cfg)
        tok = g.Tokenizer(g.make_envs(cfg, 1)[0])
    except ValueError as e:
        raise g.TrainingError(str(e) if str(e).startswith("--env") else f"--env {cfg.env}: {e}")
    policy = ArmPolicy(len(tok.words), tok.seq_len, tok.action_tokens, cfg.d_model, cfg.n_layers, cfg.n_heads,
                       with_classifier=cfg.cls_weight > 0, cls_design=cfg.cls_design).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    return device, tok, policy, gen, np.random.default_rng(cfg.seed)


@dataclass
class ArmRunState(g.RunState):
    label_gen: torch.Generator | None = None  # --cls-channel placebo's permutations (the checkpoint keeps it)


class ArmRunLog(g.RunLog):
    row_keys = ROW_KEYS  # the arms' fields too, None where a run has no value
    resume_with = "python -m studies.arms --resume"


def check_label_source(cfg: ArmConfig, env):
    g.check_label_source(cfg, env)
    if cfg.shaping == "oracle" and "flawed" not in env.reset(seed=0)[1]:
        raise g.TrainingError(f"--shaping oracle needs info['flawed'], which {cfg.env} does not give")


def train(cfg: ArmConfig, checkpoint: dict | None = None) -> dict:
    """grpo_cls.train with the arms. Returns the summary; writes the run folder."""
    device, tok, policy, gen, rng = build(cfg)
    K, G = cfg.tasks_per_iter, cfg.num_generations
    train_envs = g.make_envs(cfg, K * G)
    evaluation = g.Evaluation(cfg, tok, device, *g.probes_and_pairs(cfg, train_envs[0]))
    check_label_source(cfg, train_envs[0])
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    cls_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # the classifier's own sample stream
    label_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)  # the placebo's permutations
    run = ArmRunState(cfg, policy, opt, ref=None, gen=gen, rng=rng, cls_gen=cls_gen, label_gen=label_gen)
    pairs = repel_pairs(cfg, tok, train_envs[0], device) if cfg.cls_channel == "repel" else None
    with g.ctrl_c_stops_the_run() as stop, ArmRunLog(run, checkpoint) as log:
        if checkpoint is None:
            if cfg.pretrain != "none":
                pretrain_trunk(policy, cfg, tok, train_envs, device, cfg.pretrain)
            g.cold_start(policy, cfg, train_envs, tok, rng, gen, device)
        run.ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None  # pi_ref
        log.begin(checkpoint, first_row=lambda: evaluation(policy, 0))  # resume, or log iteration 0
        keys = (placement_keys(cfg, policy, tok, train_envs[0], device, run.metrics[-1]["iter"] == 0)
                if cfg.cls_placement != "all" else None)
        for it in log.iterations(stop):
            # 1. rollout, with what the agent saw before and after each step where the loop labels need it
            with log.timer("rollout"):
                batch = g.rollout(policy, train_envs, tok, *g.group_instances(cfg, rng), gen, device,
                                  use_mask=cfg.action_mask == "env",
                                  keys=cfg.cls_labels.startswith("loop") or cfg.shaping == "loop")
            # 2. advantages from the outcome (or shaped) reward, per step (gigpo refines them); the labels
            batch["shaped_reward"] = shaped_rewards(cfg, batch)  # (K*G,) the outcome reward, unless --shaping
            R = torch.as_tensor(batch["shaped_reward"], dtype=torch.float32, device=device).view(K, G)
            A_traj = g.group_advantages(R, cfg.scale_rewards).view(-1)                            # (K*G,)
            A = step_advantages(cfg, batch, A_traj, device)                                       # (S,)
            labels = classifier_labels(cfg, batch, A, device) if cfg.cls_weight > 0 else None   # (y, labelled)
            placement = {}
            if keys is not None:  # label placement: only at twins of the chosen half, at most PLACEMENT_CAP
                labels, placement = placed_labels(labels, batch, keys, run.label_gen, device)
            # 3. update, at a learning rate annealed linearly to 0 over the run
            for group in run.opt.param_groups:
                group["lr"] = cfg.lr * (1 - (it - 1) / cfg.iters if cfg.anneal_lr else 1)
            with log.timer("update"):
                stats = grpo_update(policy, run.ref, run.opt, cfg, batch, A, labels, gen, device, run.cls_gen,
                                    run.label_gen, pairs)
            g.check_finite(stats, it, cfg)
            stats |= placement
            # 4. evaluation every eval_every iterations; between them, the twin probes and pairs every diag_every
            if it % cfg.eval_every == 0 or it == cfg.iters:
                stats |= evaluation(policy, it)
            elif (evaluation.probes or evaluation.pairs) and it % cfg.diag_every == 0:
                with log.timer("diag"):
                    stats |= evaluation.twins(policy)
            # 5. log, and checkpoint at each evaluation and on Ctrl-C
            log.write(it, batch, R, A, stats)
            if it % cfg.eval_every == 0 or it == cfg.iters or stop.requested:
                log.checkpoint()
        return log.finish(stop)
    raise g.Interrupted(log.hard_stop_message())


def main(argv=None):
    g.main(argv, config=ArmConfig, train_fn=train, prog="python -m studies.arms")


if __name__ == "__main__":
    main()

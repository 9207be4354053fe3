"""Where the twins start: development measurements for the mechanism matrix (no registration, seeds 1-5).
python -m studies.regime [--seeds 1-3] [--env text]   # about a minute a seed on 2 cores; writes results/regime.md

A pretrained language model starts with near-identical prompts almost identical; our trunk, trained from
scratch by the cold start, starts Kitchen's twins at an embedding cosine of about 0.84. This measures, per
development seed, the mean over 128 sampled twin pairs of the cosine of the twins' pair embeddings
phi(s, a) and of their gradients of log pi(a|s):

  init          the trunk at random initialisation
  cold start    behaviour cloning on the noisy scripted agent (today's regime)
  <objective>   the trunk pretrained without task labels, alone, then followed by the cold start

The label-free objectives read observations a noisy scripted agent visits on training tasks (the same
kind of data the cold start clones, without its actions):
  mlm    masked-token prediction: 15% of an observation's words hidden, predicted from the trunk's output
         at their positions (which may push twins apart: the changed word must be told apart)
  next   the bag of words of the next observation, predicted from h(s), the <s> position's output

It also reads the flawed rate after cold starts of several strengths (--sft-steps, --sft-noise), to fix
the weak cold start (the danger zone, where flawed actions start likely) by the rate it starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import grpo_cls as g
from studies.store import seed_list, write_report

OBJECTIVES = ("mlm", "next")
PRETRAIN_STEPS, PRETRAIN_LR, MASK_SHARE = 300, 2e-3, 0.15
COLD_STARTS = ((150, 0.3), (100, 0.3), (75, 0.3), (50, 0.3), (150, 0.45), (100, 0.45), (150, 0.6))  # (steps, noise); first: today


def observations(cfg: g.Config, tok, envs_, rng, gen, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (N, L) of the states a noisy scripted agent visits (two rounds over the envs), the next
    observation's tokens (N, L), and whether there is a next one (N,)."""
    def noisy_expert(env, mask):
        return int(rng.choice(np.flatnonzero(mask))) if rng.random() < 0.3 else env.unwrapped.optimal_action()
    xs, nxt, has = [], [], []
    policy = g.Policy(len(tok.words), tok.seq_len, tok.action_tokens, cfg.d_model, cfg.n_layers, cfg.n_heads,
                      with_classifier=False).to(device)  # only to drive rollout(); pick() chooses the actions
    for _ in range(2):
        n = len(envs_)
        b = g.rollout(policy, envs_, tok, tasks=rng.integers(2**31 - 1, size=n), seeds=rng.integers(2**31 - 1, size=n),
                      gen=gen, device=device, pick=noisy_expert)
        for j in range(n):
            idx = np.flatnonzero(b["traj"] == j)  # this trajectory's steps, in order
            xs.append(b["tokens"][idx])
            nxt.append(np.concatenate([b["tokens"][idx[1:]], np.zeros_like(b["tokens"][idx[:1]])]))
            has.append(np.arange(len(idx)) < len(idx) - 1)
    return tuple(torch.as_tensor(np.concatenate(v), device=device) for v in (xs, nxt, has))


def pretrain(policy: g.Policy, objective: str, x, x_next, has_next, gen):
    """PRETRAIN_STEPS Adam steps of the label-free objective on the trunk (a head of its own, dropped after)."""
    vocab, d = policy.tok_emb.num_embeddings, policy.ln_f.normalized_shape[0]
    head = nn.Linear(d, vocab).to(x.device)
    opt = torch.optim.Adam(list(policy.parameters()) + list(head.parameters()), lr=PRETRAIN_LR)
    rows = torch.arange(len(x), device=x.device) if objective == "mlm" else torch.nonzero(has_next).squeeze(1)
    for _ in range(PRETRAIN_STEPS):
        idx = rows[torch.randint(len(rows), (64,), generator=gen, device=x.device)]
        tokens = x[idx]
        if objective == "mlm":
            words = tokens > 1  # not <pad>, not <s>
            hide = words & (torch.rand(tokens.shape, generator=gen, device=x.device) < MASK_SHARE)
            out = policy.trunk(tokens.masked_fill(hide, 0))  # a hidden word reads as padding
            loss = F.cross_entropy(head(out[hide]), tokens[hide]) if hide.any() else out.sum() * 0
        else:
            target = torch.zeros(len(idx), vocab, device=x.device).scatter_(1, x_next[idx], 1.0)
            target[:, :2] = 0  # <pad> and <s> are in every observation
            loss = F.binary_cross_entropy_with_logits(head(policy.state_embedding(tokens)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def twin_cosines(policy, tok, pairs, device) -> dict:
    row = g.pair_diagnostics(policy, tok, pairs, device, with_grads=True)
    return {"embed": float(np.mean(row["pair_embed_cos"])), "grad": float(np.mean(row["pair_grad_cos"])),
            "pi_flawed": row["pair_flawed_prob"]}


def placement_share(cfg, policy, tok, envs_, rng, gen, device, n_pairs: int = 512) -> dict:
    """Label placement's raw material: in one training batch of the cold-started policy, the share of steps
    whose observation is a twin of one of n_pairs training pairs (sampled with another seed than the
    measured pairs), and their number."""
    train_pairs = envs_[0].unwrapped.twin_pairs(n_pairs, seed=10_000 + cfg.seed)
    twins = {tok.encode(p[k]).tobytes() for p in train_pairs for k in ("obs_good", "obs_flawed")}
    b = g.rollout(policy, envs_, tok, *g.group_instances(cfg, rng), gen, device)
    hits = np.array([t.tobytes() in twins for t in b["tokens"]])
    return {"share": float(hits.mean()), "steps": int(hits.sum()), "batch": len(hits)}


def fresh(cfg: g.Config):
    """A newly initialised policy and the run's seeded generators, as train() builds them."""
    device, tok, policy, gen, rng = g.build(cfg)
    envs_ = g.make_envs(cfg, cfg.tasks_per_iter * cfg.num_generations)
    return device, tok, policy, gen, rng, envs_


def measure_seed(seed: int, env: str) -> dict:
    cfg = g.Config(env=env, seed=seed, out="unused", threads=2)
    device, tok, policy, gen, rng, envs_ = fresh(cfg)
    pairs = g.probes_and_pairs(dataclasses.replace(cfg, twin_pairs=128), envs_[0])[1]
    out = {"init": twin_cosines(policy, tok, pairs, device)}
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
    out["cold start"] = twin_cosines(policy, tok, pairs, device)
    out["placement"] = placement_share(cfg, policy, tok, envs_, rng, gen, device)
    for objective in OBJECTIVES:
        device, tok, policy, gen, rng, envs_ = fresh(cfg)
        data_rng = np.random.default_rng(10_000 + seed)  # the pretraining data: its own stream
        x, x_next, has_next = observations(cfg, tok, envs_, data_rng, gen, device)
        pretrain(policy, objective, x, x_next, has_next, gen)
        out[objective] = twin_cosines(policy, tok, pairs, device)
        g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
        out[f"{objective} + cold start"] = twin_cosines(policy, tok, pairs, device)
    for steps, noise in COLD_STARTS:
        weak = dataclasses.replace(cfg, sft_steps=steps, sft_noise=noise, eval_tasks=128)
        device, tok, policy, gen, rng, envs_ = fresh(weak)
        g.cold_start(policy, weak, envs_, tok, rng, gen, device)
        evaluation = g.Evaluation(weak, tok, device, [], [])
        r = g.evaluate(policy, tok, evaluation.envs[""], torch.Generator(device=device).manual_seed(seed + 7919), device)
        out[f"sft {steps} x noise {noise}"] = {"flawed": r["flawed"], "success": r["success"]}
    return out


def report(env: str, seeds: list[int], results: dict) -> str:
    rows = [k for k in results[seeds[0]] if not k.startswith("sft") and k != "placement"]
    lines = [f"# Where the twins start ({env}; development seeds {', '.join(map(str, seeds))})", "",
             "Generated by `python -m studies.regime`. Development measurements for the mechanism matrix: they "
             "register nothing. Each cell: the mean over seeds (each seed's value the mean over 128 sampled twin "
             "pairs), with the seeds' range.", "",
             "| trunk | embedding cosine of the twins | gradient cosine of the twins | pi(a | flawed twin) |",
             "|---|---|---|---|"]
    cell = lambda v: f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"  # noqa: E731
    for k in rows:
        lines.append(f"| {k} | " + " | ".join(cell([results[s][k][m] for s in seeds])
                                              for m in ("embed", "grad", "pi_flawed")) + " |")
    lines += ["", "The cold start's strength and the flawed rate it leaves (in-domain evaluation, 128 tasks):", "",
              "| --sft-steps x --sft-noise | flawed rate | success |", "|---|---|---|"]
    for k in (k for k in results[seeds[0]] if k.startswith("sft")):
        lines.append(f"| {k[4:]} | {cell([results[s][k]['flawed'] for s in seeds])} "
                     f"| {cell([results[s][k]['success'] for s in seeds])} |")
    place = [results[s]["placement"] for s in seeds]
    lines += ["", f"Label placement: in one training batch of the cold-started policy, "
              f"{cell([p['share'] for p in place])} of the steps (on average {np.mean([p['steps'] for p in place]):.0f} "
              f"of {np.mean([p['batch'] for p in place]):.0f}) see an observation that is a twin of one of 512 "
              f"training pairs (sampled with another seed than the measured ones)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.regime", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1-3", help="development seeds (1-5 only)")
    p.add_argument("--env", default="text")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    seeds = seed_list(args.seeds)
    if any(s > 5 for s in seeds):
        p.error("development seeds are 1-5; fresh seeds belong to a registered matrix")
    results = {}
    for s in seeds:
        print(f"seed {s} ...", flush=True)
        results[s] = measure_seed(s, args.env)
    text = report(args.env, seeds, results)
    write_report(os.path.join(args.out, f"regime-{args.env}.md"), text)


if __name__ == "__main__":
    main()

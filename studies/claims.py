"""The paper's claims, each measured directly (arXiv:2509.23870). Run: make claims

  1. Lemma 3.1: outcome rewards punish a risky step in expectation, E[A * 1{risky}] < 0.
  2. Theorem 3.2: the squeezing effect of a negative step does not rescue bad actions in expectation.
  3. Gradient coupling: a step that raises action a in state s1 moves log pi(a | s2) by about
     lr * A * <grad log pi(a|s1), grad log pi(a|s2)>, in a near-identical state s2 where a is flawed.

Writes results/claims.md, results/squeeze.png and results/probe_rise.png (3b trains 10 runs of plain
GRPO, about 10 minutes on 2 cores; `python -m studies.claims --quick` skips it). Each function is small and pure so the
tests can check it exactly; this file imports the policy and the loss math from grpo_cls.py, and Lemma 3.1 and the
one-step coupling from studies.toys (which studies.explain shares).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import numpy as np
import torch

import grpo_cls as g
from studies import arms
from studies.store import seed_list
from studies.toys import lemma31_expected_advantage, one_step_coupling, simulate_lemma31

# ---------------------------------------------------------------------------------------------
# 2. The squeezing effect, one softmax step (3 actions)
# ---------------------------------------------------------------------------------------------

GOOD, MILD, HARMFUL = 0, 1, 2  # a good action, a mildly flawed action that is the mode, a harmful one


def softmax_step(z: np.ndarray, y: int, A: float, lr: float) -> np.ndarray:
    """Logits after one policy-gradient step with advantage A on action y: z + lr * A * (e_y - p)."""
    p = np.exp(z - z.max())
    p /= p.sum()
    return z + lr * A * (np.eye(len(z))[y] - p)


def expected_softmax_step(z: np.ndarray, A_true: np.ndarray, lr: float) -> np.ndarray:
    """The same step in expectation over y ~ p, each action with its true advantage:
    z + lr * p * (A - sum_y p_y A_y)."""
    p = np.exp(z - z.max())
    p /= p.sum()
    return z + lr * p * (A_true - p @ A_true)


def probs(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max())
    return p / p.sum()


SQUEEZE_LOGITS = np.array([0.0, 2.0, 0.5])       # the mildly flawed action is the mode
SQUEEZE_ADVANTAGES = np.array([1.0, -0.3, -1.5])  # true advantages: good > mild > harmful


def plot_squeeze(path: str, lr: float = 1.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = SQUEEZE_LOGITS
    cases = [("before", probs(z)),
             ("one step, A = -1 on 'harmful'", probs(softmax_step(z, HARMFUL, -1.0, lr))),
             ("expected step over y ~ p", probs(expected_softmax_step(z, SQUEEZE_ADVANTAGES, lr)))]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.27
    for k, (name, p) in enumerate(cases):
        ax.bar(np.arange(3) + (k - 1) * width, p, width, label=name)
    ax.set_xticks(range(3), ["good", "mildly flawed (mode)", "harmful"])
    ax.set_ylabel("pi(a)")
    ax.set_title("squeezing: a negative step feeds the mode; the expected step still favours 'good'", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 3. Gradient coupling: the mechanism isolated, and coupling over training (one step: studies.toys)
# ---------------------------------------------------------------------------------------------

def mechanism(env: str, epochs: int = 10, seed: int = 1, **overrides) -> dict:
    """Does classification alone pull the twins apart? From one cold-started policy and one training
    batch, `epochs` passes of the classification loss alone (oracle labels, every advantage 0, so the
    policy gradient is off), against the same passes of the policy gradient alone (the batch's own
    advantages, the classifier weighted 0). Returns the twin probes' embedding and gradient cosines,
    each (probes,), before and after each arm, and the parameters each arm moved. `overrides` are Config
    fields (the tests shrink the model and the batch)."""
    cfg = arms.ArmConfig(**{"env": env, "seed": seed, "cls_weight": 1.0, "cls_labels": "oracle",
                            "num_iterations": epochs, "out": "unused", "quiet": True} | overrides)
    device, tok, policy, gen, rng = arms.build(cfg)
    K, G = cfg.tasks_per_iter, cfg.num_generations
    envs_ = g.make_envs(cfg, K * G)
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
    tasks, seeds = np.repeat(rng.integers(2**31 - 1, size=K), G), rng.integers(2**31 - 1, size=K * G)
    batch = g.rollout(policy, envs_, tok, tasks, seeds, gen, device)
    R = torch.as_tensor(batch["reward"], dtype=torch.float32, device=device).view(K, G)
    A = arms.step_advantages(cfg, batch, g.group_advantages(R).view(-1), device)
    probes, start = envs_[0].unwrapped.twin_probes(), copy.deepcopy(policy.state_dict())

    def cosines():
        d = g.probe_diagnostics(policy, tok, probes, device)
        return {"embed_cos": d["embed_cos_each"], "grad_cos": d["grad_cos_twin_each"]}
    out = {"before": cosines()}
    for arm, arm_cfg, advantages in (("classification alone", cfg, torch.zeros_like(A)),
                                     ("policy gradient alone", dataclasses.replace(cfg, cls_weight=0.0), A)):
        policy.load_state_dict(start)
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
        arms.grpo_update(policy, None, opt, arm_cfg, batch, advantages, None, torch.Generator().manual_seed(seed),
                         device)
        moved = {n for n, p in policy.state_dict().items() if not torch.equal(p, start[n])}
        out[arm] = cosines() | {"moved": moved}
    return out


def plot_mechanism(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    arms = ("before", "classification alone", "policy gradient alone")
    for ax, key, name in zip(axes, ("embed_cos", "grad_cos"), ("embedding cosine", "gradient cosine")):
        width = 0.8 / len(results)
        for k, (env, r) in enumerate(results.items()):
            means = [np.mean(r[a][key]) for a in arms]
            ax.bar(np.arange(len(arms)) + k * width, means, width, label=env)
        ax.set_xticks(np.arange(len(arms)) + width / 2, arms, fontsize=8)
        ax.set_title(f"twin probes: {name} (mean over probes)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def coupling_over_training(env: str, seeds, out_dir: str, iters: int = 80) -> list[dict]:
    """Plain GRPO (--cls-weight 0 --diag-every 1 --iters `iters`, default config otherwise) per seed: pi(flawed action | flawed twin),
    averaged over the twin probes, at every iteration. The measure and the 1.5x bar were fixed before
    any of these runs: peak over iterations / value at iteration 0 (the cold-started policy)."""
    rows = []
    for seed in seeds:
        run = os.path.join(out_dir, "runs", f"{env}-plain-seed{seed}")
        cfg = arms.ArmConfig(env=env, seed=seed, cls_weight=0.0, out=run, quiet=True, diag_every=1,
                             iters=iters)
        arms.train(cfg)
        metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        curve = [(m["iter"], m["probe_flawed_prob"]) for m in metrics if m["probe_flawed_prob"] is not None]
        initial = curve[0][1]
        peak_iter, peak = max(curve, key=lambda c: c[1])
        rows.append({"env": env, "seed": seed, "initial": initial, "peak": peak, "peak_iter": peak_iter,
                     "final": curve[-1][1], "ratio": peak / initial, "curve": curve})
    return rows


def plot_rise(rows: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({r["env"] for r in rows})
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 3.4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for r in (r for r in rows if r["env"] == env):
            x, y = zip(*r["curve"])
            ax.plot(x, y, label=f"seed {r['seed']} (peak/initial {r['ratio']:.2f})")
        ax.set_title(f"{env}, plain GRPO: mean pi(flawed action | flawed twin)", fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mechanism_section(out_dir: str) -> list[str]:
    """Claim 3c: the markdown lines and mechanism.png (about a minute on 2 cores)."""
    lines = ["", "## 3c. The mechanism, isolated: classification alone against the policy gradient alone", "",
             "![mechanism](mechanism.png)", "",
             "From one cold-started policy (seed 1) and one training batch: 10 passes of the classification "
             "loss alone (oracle labels, advantages 0), against 10 passes of the policy gradient alone (the "
             "batch's advantages, classifier weight 0), at the default learning rate. Per probe, then the "
             "mean (`claims.mechanism`).", "",
             "| env | arm | embedding cosine per probe | mean | gradient cosine per probe | mean |",
             "|---|---|---|---|---|---|"]
    mech = {env: mechanism(env) for env in ("text", "grid")}
    for env, r in mech.items():
        for arm in ("before", "classification alone", "policy gradient alone"):
            e, gc = r[arm]["embed_cos"], r[arm]["grad_cos"]
            lines.append(f"| {env} | {arm} | {' '.join(f'{v:.2f}' for v in e)} | {np.mean(e):.3f} | "
                         f"{' '.join(f'{v:.2f}' for v in gc)} | {np.mean(gc):.3f} |")
    plot_mechanism(mech, os.path.join(out_dir, "mechanism.png"))
    return lines


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def main(out_dir: str = "results", over_training: bool = True, seeds=range(1, 6), iters: int = 80):
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# The paper's claims, measured", "", "Generated by `make claims` (`python -m studies.claims`).", ""]

    lines += ["## 1. Lemma 3.1: E[A * 1{risky}] = ((G-1)/G) q r (q-1) < 0", "",
              "Monte Carlo, 200,000 groups each, mean-only baseline (`--scale-rewards none`), p_safe = 0.8.", "",
              "| q | r | G | exact | Monte Carlo | standard error | within 3 SE |", "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for q in (0.2, 0.5, 0.8):
        for r in (0.3, 0.6):
            for G in (2, 8):
                exact = lemma31_expected_advantage(q, r, G)
                est, se = simulate_lemma31(q, r, G, 0.8, 200_000, "none", rng)
                lines.append(f"| {q} | {r} | {G} | {exact:.4f} | {est:.4f} | {se:.4f} | "
                             f"{'yes' if abs(est - exact) <= 3 * se else 'NO'} |")

    z = SQUEEZE_LOGITS
    p0, p1 = probs(z), probs(softmax_step(z, HARMFUL, -1.0, 1.0))
    pe = probs(expected_softmax_step(z, SQUEEZE_ADVANTAGES, 1.0))
    lines += ["", "## 2. The squeezing effect (3-action softmax, lr = 1)", "",
              "![squeeze](squeeze.png)", "",
              "| | pi(good) | pi(mildly flawed, the mode) | pi(harmful) | bad mass |", "|---|---|---|---|---|"]
    for name, p in (("before", p0), ("one step, A = -1 on harmful", p1), ("expected step", pe)):
        lines.append(f"| {name} | {p[0]:.3f} | {p[1]:.3f} | {p[2]:.3f} | {p[1] + p[2]:.3f} |")
    plot_squeeze(os.path.join(out_dir, "squeeze.png"))

    lines += ["", "## 3. Gradient coupling, one step on the good twin", "",
              "A cold-started policy (default config), one plain gradient step with lr = 1e-3 and A = 1 on the",
              "good twin only; the change of log pi(a | flawed twin) against its first-order prediction.", "",
              "| env | probe | actual change | predicted lr*A*<g1,g2> | grad cosine |", "|---|---|---|---|---|"]
    for env in ("text", "grid"):
        cfg = arms.ArmConfig(env=env, out="unused", quiet=True)
        device, tok, policy, gen, rng_t = arms.build(cfg)
        envs_ = g.make_envs(cfg, 64)
        g.cold_start(policy, cfg, envs_, tok, rng_t, gen, device)
        probes = envs_[0].unwrapped.twin_probes()
        cos = g.probe_diagnostics(policy, tok, probes, device)
        for k, p in enumerate(probes):
            actual, predicted = one_step_coupling(policy, tok, p, 1e-3, 1.0, device)
            lines.append(f"| {env} | {p['note']} | {actual:+.5f} | {predicted:+.5f} | "
                         f"{cos['grad_cos_twin_each'][k]:.2f} |")
    lines += mechanism_section(out_dir)
    if over_training:
        lines += ["", f"## 3b. Coupling over training, plain GRPO, {len(seeds)} seeds per task", "",
                  "![probe rise](probe_rise.png)", "",
                  "Mean over the twin probes of pi(flawed action | flawed twin), logged at every iteration of",
                  f"`python grpo_cls.py --env ENV --seed S --diag-every 1 --iters {iters}` (plain GRPO, default config otherwise). Peak / initial compares the",
                  "highest value over training with the cold-started policy at iteration 0. Bar, fixed in advance: 1.5x.", "",
                  "| env | seed | initial | peak (iteration) | final | peak / initial | >= 1.5x |", "|---|---|---|---|---|---|---|"]
        rows = []
        for env in ("text", "grid"):
            rows += coupling_over_training(env, seeds, out_dir, iters)
        for r in rows:
            lines.append(f"| {r['env']} | {r['seed']} | {r['initial']:.3f} | {r['peak']:.3f} ({r['peak_iter']}) | "
                         f"{r['final']:.3f} | {r['ratio']:.2f} | {'yes' if r['ratio'] >= 1.5 else 'no'} |")
        for env in ("text", "grid"):
            hits = sum(r["ratio"] >= 1.5 for r in rows if r["env"] == env)
            lines.append(f"\n{env}: a rise of at least 1.5x in {hits} of {len(seeds)} seeds.")
        plot_rise(rows, os.path.join(out_dir, "probe_rise.png"))
    with open(os.path.join(out_dir, "claims.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


OPTIMIZER_KEYS = (("grad_clipped_frac", "share of steps whose policy-gradient clip acted"),
                  ("cls_grad_clipped_frac", "share of steps whose classifier clip acted"),
                  ("pg_grad_norm", "policy-gradient norm, before its clip"),
                  ("cls_grad_norm", "classifier norm (times cls_weight), before its clip"),
                  ("cls_pg_grad_ratio", "classifier / policy-gradient norm, shared parameters"),
                  ("joint_clip_pg_scale", "policy-gradient step under one joint clip, relative to its own"),
                  ("adam_pg_step_scale", "policy-gradient Adam step, relative to a second moment of its own"),
                  ("cos_v_w", "cosine of the classifier head v and the policy head w"))


def optimizer_section(run_dirs: list[str]) -> list[str]:
    """The clip and Adam logs of finished classifier runs (metrics.jsonl), as means of the per-iteration
    values over iterations 1-10, 11 to the end, and all, and the last iteration's value: what the two
    streams' sharing of one optimizer does to the policy gradient."""
    lines = []
    for run_dir in run_dirs:
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][1:]
        lines += ["", f"### `{run_dir}`: {cfg['env']}, seed {cfg['seed']}, cls_weight {cfg['cls_weight']}, "
                      f"{cfg['cls_labels']} labels, {len(rows)} iterations", "",
                  "| log | what it is | iterations 1-10 | 11 to the end | all | last |", "|---|---|---|---|---|---|"]
        for key, what in OPTIMIZER_KEYS:
            cells = []
            for part in (rows[:10], rows[10:], rows, rows[-1:]):
                v = [r[key] for r in part if r.get(key) is not None]
                cells.append(f"{np.mean(v):.3f}" if v else "n/a")
            lines.append(f"| `{key}` | {what} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.claims", description="The paper's claims, each measured "
                                "directly (make claims): results/claims.md, squeeze.png, probe_rise.png, mechanism.png")
    p.add_argument("--quick", action="store_true", help="skip claim 3b's 10 training runs")
    p.add_argument("--mechanism", action="store_true", help="only claim 3c, into results/mechanism.md")
    p.add_argument("--optimizer", nargs="+", metavar="RUN_DIR", help="only the clip and Adam logs of these finished "
                   "runs, into results/optimizer.md (make optimizer)")
    p.add_argument("--out", default="results", help="folder for the reports and figures")
    p.add_argument("--seeds", default="1-5", help="claim 3b's seeds per task, as '1-5' or '1,3'")
    p.add_argument("--iters", type=int, default=80, help="claim 3b's GRPO iterations per run")
    args = p.parse_args(argv)
    args.seeds = seed_list(args.seeds)
    return args


if __name__ == "__main__":
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.optimizer:  # python -m studies.claims --optimizer RUN_DIR ...: into results/optimizer.md
        dirs = args.optimizer
        text = "\n".join(["# One optimizer, two streams: the clip and Adam logs", "",
                          f"Generated by `python -m studies.claims --optimizer {' '.join(dirs)}` (`make optimizer`)."]
                         + optimizer_section(dirs))
        open(os.path.join(args.out, "optimizer.md"), "w").write(text + "\n")
        print(text)
    elif args.mechanism:  # claim 3c alone, into results/mechanism.md
        text = "\n".join(["# The mechanism, isolated", "", "Generated by `python -m studies.claims --mechanism` "
                           "(`make claims` writes the same section into claims.md)."] + mechanism_section(args.out))
        open(os.path.join(args.out, "mechanism.md"), "w").write(text + "\n")
        print(text)
    else:
        main(args.out, not args.quick, args.seeds, args.iters)

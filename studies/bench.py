"""make bench: measure the trainer against this machine's own ceilings. Writes results/bench.json, prints a table.

Every ratio compares the real code path with a bare ceiling measured in the same process, back to
back, on the same model, batch sizes and thread count:
  rollout efficiency  = real rollout env steps/s  / (1 / (1/R_forward + 1/R_env))
  update efficiency   = grpo_update samples/s     / bare forward+backward+Adam samples/s
  end-to-end          = training env steps/s      / the two ceilings combined for the same work, the
                        ceilings measured just before and just after the run and averaged
Run it alone: another heavy process on the 2 cores makes every number meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import grpo_cls as g

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where grpo_cls.py is


def timed(fn, repeat: int = 3) -> float:
    """Best-of-`repeat` seconds of fn() (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def setup(cfg: g.Config):
    """A cold-started policy and the envs of one iteration, as train() would have them."""
    device, tok, policy, gen, rng = g.build(cfg)
    envs_ = g.make_envs(cfg, cfg.tasks_per_iter * cfg.num_generations)
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
    return device, tok, policy, gen, rng, envs_


def iteration_inputs(cfg, rng, n):
    tasks = np.repeat(rng.integers(2**31 - 1, size=n // cfg.num_generations), cfg.num_generations)
    return tasks, rng.integers(2**31 - 1, size=n)


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def forward_seconds(policy, tokens, masks, live_counts, gen, device) -> float:
    """Forward + sample for the same sequence of batch sizes the rollout saw (episodes drop out)."""
    x, m = torch.as_tensor(tokens, device=device), torch.as_tensor(masks, device=device)

    def run():
        for n in live_counts:
            logits = policy(x[:n], m[:n])[0]
            torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).cpu()
    return timed(run)


def env_steps_per_s(envs_, rng, steps: int) -> float:
    """The envs' own step rate with random admissible actions, no policy at all."""
    done, infos, n, t = [True] * len(envs_), [None] * len(envs_), 0, 0.0
    while n < steps:
        for i, e in enumerate(envs_):
            if done[i]:
                _, infos[i] = e.reset(seed=int(rng.integers(2**31 - 1)))
            a = int(rng.choice(np.flatnonzero(infos[i]["action_mask"])))
            t0 = time.perf_counter()
            _, _, term, trunc, infos[i] = e.step(a)
            t += time.perf_counter() - t0
            done[i], n = term or trunc, n + 1
    return n / t


def bare_update_samples_per_s(policy, batch, cfg, device, steps: int = 30) -> float:
    """The same model, the same minibatch size: forward, a loss, backward, clip, Adam. Nothing else."""
    opt = torch.optim.Adam(policy.parameters(), lr=1e-9)
    x, m = torch.as_tensor(batch["tokens"], device=device), torch.as_tensor(batch["mask"], device=device)
    a = torch.as_tensor(batch["action"], device=device)
    idx = torch.arange(cfg.minibatch_size, device=device) % len(a)

    def run():
        for _ in range(steps):
            logits = policy(x[idx], m[idx])[0]
            loss = F.cross_entropy(logits, a[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
    return steps * cfg.minibatch_size / timed(run)


# ---------------------------------------------------------------------------------------------
# The real code paths
# ---------------------------------------------------------------------------------------------

def measure_rollout(cfg, device, tok, policy, gen, rng, envs_) -> dict:
    tasks, seeds = iteration_inputs(cfg, rng, len(envs_))
    batches = []
    t = timed(lambda: batches.append(g.rollout(policy, envs_, tok, tasks, seeds, gen, device)))
    b = batches[-1]
    steps = len(b["action"])
    live = [int((b["length"] > s).sum()) for s in range(int(b["length"].max()))]  # batch size at each step
    first_obs = b["tokens"][np.flatnonzero(np.r_[True, b["traj"][1:] != b["traj"][:-1]])]  # (N, L)
    first_mask = b["mask"][np.flatnonzero(np.r_[True, b["traj"][1:] != b["traj"][:-1]])]
    R_forward = steps / forward_seconds(policy, first_obs, first_mask, live, gen, device)
    R_env = env_steps_per_s(envs_, np.random.default_rng(0), steps=4 * steps)
    ceiling = 1 / (1 / R_forward + 1 / R_env)
    real = steps / t
    return {"rollout_steps_per_s": real, "R_forward": R_forward, "R_env": R_env, "rollout_ceiling": ceiling,
            "rollout_efficiency": real / ceiling, "rollout_batch": len(envs_), "batch": b}


def processed_samples(row: dict, steps: int, epochs: int = 1) -> int:
    """Samples an update forwarded and backpropagated: the policy-gradient stream's, plus the classifier
    stream's labelled steps in each epoch (none when no optimizer step ran)."""
    labelled = round((row.get("cls_labelled_frac") or 0) * steps) if row["opt_steps"] else 0
    return row["update_samples"] + labelled * epochs


def update(run, batch, A) -> dict:
    """What train() does in its update phase: the labels, grpo_cls.grpo_update and its statistics."""
    labels = g.classifier_labels(run.cfg, batch, A) if run.cfg.cls_weight > 0 else None
    return g.update_stats(g.grpo_update(run, batch, A, labels), run, batch, labels)


def measure_update(cfg, device, policy, gen, batch) -> dict:
    K, G = cfg.tasks_per_iter, cfg.num_generations
    R = torch.as_tensor(batch["reward"], dtype=torch.float32, device=device).view(K, G)
    A = g.group_advantages(R, cfg.scale_rewards).view(-1)[torch.as_tensor(batch["traj"], device=device)]  # (S,)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-9)  # a tiny lr: the policy stays as it is
    run, stats = g.RunState(cfg, policy, opt, None, gen, None, torch.Generator(device=device).manual_seed(1)), []
    t = timed(lambda: stats.append(update(run, batch, A)))
    useful = processed_samples(stats[-1], len(batch["action"]), cfg.num_iterations)
    real = useful / t
    bare = bare_update_samples_per_s(policy, batch, cfg, device)
    return {"update_samples_per_s": real, "bare_update_samples_per_s": bare, "update_efficiency": real / bare,
            "update_samples": useful}


def measure_naive(cfg, device, tok, policy, gen, envs_, steps: int = 300) -> float:
    """One env, one forward of batch 1 per step: the loop the batched rollout replaces."""
    env, n, t0 = envs_[0], 0, time.perf_counter()
    with torch.inference_mode():
        while n < steps:
            obs, info = env.reset(seed=n)
            done = False
            while not done and n < steps:
                x = torch.as_tensor(tok.encode(obs), device=device)[None]
                m = torch.as_tensor(info["action_mask"].astype(bool), device=device)[None]
                a = torch.multinomial(torch.softmax(policy(x, m)[0], -1), 1, generator=gen).item()
                obs, _, term, trunc, info = env.step(a)
                done, n = term or trunc, n + 1
    return n / (time.perf_counter() - t0)


def measure_scaling(base: g.Config, sizes=(4, 16, 64)) -> list[dict]:
    rows = []
    for K in sizes:
        cfg = g.Config(**{**base.__dict__, "tasks_per_iter": K})
        device, tok, policy, gen, rng, envs_ = setup(cfg)
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
        run = g.RunState(cfg, policy, opt, None, gen, rng, torch.Generator(device=device).manual_seed(1))

        def iteration():
            tasks, seeds = iteration_inputs(cfg, rng, len(envs_))
            b = g.rollout(policy, envs_, tok, tasks, seeds, gen, device)
            R = torch.as_tensor(b["reward"], dtype=torch.float32).view(K, cfg.num_generations)
            update(run, b, g.group_advantages(R).view(-1)[torch.as_tensor(b["traj"], device=device)])
        rows.append({"trajectories": K * cfg.num_generations, "s_per_iter": timed(iteration)})
    return rows


def measure_batch_sweep(policy, batch, device, sizes=(8, 32, 64, 128, 256, 512)) -> dict:
    x_all, m_all = torch.as_tensor(batch["tokens"]), torch.as_tensor(batch["mask"])
    out = {}
    with torch.inference_mode():
        for n in sizes:
            idx = torch.arange(n) % len(x_all)
            x, m = x_all[idx].to(device), m_all[idx].to(device)
            out[n] = 20 * n / timed(lambda: [policy(x, m) for _ in range(20)])
    return out


# ---------------------------------------------------------------------------------------------
# Whole runs in subprocesses: the default run's time, the phase breakdown, memory
# ---------------------------------------------------------------------------------------------

# The child reports its own peak RSS at exit: VmHWM of /proc/self/status. Not ru_maxrss: Linux keeps
# that across fork and execve, so a child would inherit this (large) process's high-water mark.
PEAK_RSS = ("import atexit, sys; atexit.register(lambda: print('PEAK_RSS_KIB', next(l.split()[1] for l in "
            "open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)); ")


def cpu_name() -> str:
    """The CPU's model name and its widest vector units, from /proc/cpuinfo (the platform's name elsewhere):
    machines of one name can differ by 2x in this code's speed."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [u for f, u in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if f in flags] or (
        ["AVX2"] if "avx2" in flags else [])
    return f"{name} ({', '.join(units)})" if units else name


def make_run_flags() -> list[str]:
    """The flags of the Makefile's run target (after `grpo_cls.py`, without --overwrite): what make run trains."""
    recipe = open(os.path.join(ROOT, "Makefile")).read().split("\nrun:")[1].split("\n")[1]
    return [a for a in recipe.split("grpo_cls.py", 1)[1].split() if a != "--overwrite"]


def peak_mib(stderr: str) -> float:
    return int(next(line.split()[1] for line in stderr.splitlines() if line.startswith("PEAK_RSS_KIB"))) / 1024


def run_subprocess(args: list[str], out: str) -> tuple[float, dict, list[dict], float]:
    """Seconds, summary, metrics and peak RSS (MiB) of `python grpo_cls.py ARGS`."""
    argv = ["grpo_cls.py", *args, "--out", out, "--overwrite", "--quiet"]
    script = os.path.join(ROOT, "grpo_cls.py")
    code = PEAK_RSS + f"import runpy; sys.argv = {argv!r}; runpy.run_path({script!r}, run_name='__main__')"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return seconds, json.load(open(os.path.join(out, "summary.json"))), metrics, peak_mib(r.stderr)


def time_split(seconds: float, it_rows: list[dict], phases: dict, steps_each) -> dict:
    """Where a classifier run's time goes: its updates, over how many samples of each stream, and the time
    outside the loop (start-up, the cold start, plots)."""
    return {"outside_loop_s": seconds - it_rows[-1]["wall_s"], "update_s": phases["update"],
            "pg_samples": int(sum(m["update_samples"] for m in it_rows)),
            "cls_samples": int(sum(round(m["cls_labelled_frac"] * n) for m, n in zip(it_rows, steps_each)))}


def time_pair(args, out: str, yardstick_s: float) -> dict:
    """make run's pair, timed as a user runs it; its rule: within 60 s, or within the yardstick where that
    is slower."""
    flags = make_run_flags()
    short = [] if args.iters is None else ["--iters", str(args.iters)]
    seconds, *_ = run_subprocess(flags + ["--threads", str(args.threads), "--device", args.device] + short, out)
    return {"make_run_s": seconds, "make_run_flags": flags, "make_run_limit_s": max(60.0, yardstick_s)}


def torch_baseline_rss_mib() -> float:
    r = subprocess.run([sys.executable, "-c", PEAK_RSS + "import torch"], capture_output=True, text=True, check=True)
    return peak_mib(r.stderr)


def print_table(r: dict, mem: tuple = (5, 50)):
    rows = [
        ("rollout efficiency", f"{r['rollout_efficiency']:.2f}", ">= 0.9",
         f"{r['rollout_steps_per_s']:.0f} steps/s vs ceiling {r['rollout_ceiling']:.0f} "
         f"(R_forward {r['R_forward']:.0f}, R_env {r['R_env']:.0f})"),
        ("update efficiency", f"{r['update_efficiency']:.2f}", ">= 0.85",
         f"{r['update_samples_per_s']:.0f} vs bare {r['bare_update_samples_per_s']:.0f} samples/s"),
        ("end-to-end efficiency", f"{r['end_to_end_efficiency']:.2f}", ">= 0.8",
         f"{r['env_steps_per_s']:.0f} env steps/s in the default run; against the ceilings measured before / "
         f"after it alone: " + " / ".join(f"{v:.2f}" for v in r["end_to_end_before_after"])),
        ("eval + diagnostics share", f"{r['eval_and_diag_share']:.1%}", "< 15%",
         ", ".join(f"{k} {v:.0%}" for k, v in r["time_share"].items())),
        ("batched vs naive", f"{r['batched_speedup']:.1f}x", ">= 10x", f"naive {r['naive_steps_per_s']:.0f} steps/s"),
        ("scaling (s/iter)", " / ".join(f"{s['s_per_iter']:.2f}" for s in r["scaling"]), "<= linear",
         "at " + " / ".join(str(s["trajectories"]) for s in r["scaling"]) + " trajectories per iteration"),
        (f"memory growth {mem[0]} -> {mem[1]} it", f"{r['mem_growth']:+.1%}", "< 10%",
         f"{r['rss_5_iters_mib']:.0f} -> {r['rss_50_iters_mib']:.0f} MiB above import torch "
         f"({r['rss_torch_import_mib']:.0f} MiB)"),
        ("a classifier run, defaults", f"{r['default_run_s']:.1f} s", "yardstick",
         f"python grpo_cls.py --cls-weight 0.5; final in-domain success {r['default_success_rate']:.2f}"),
        ("make run's pair", f"{r['make_run_s']:.1f} s", f"<= {r['make_run_limit_s']:.0f} s",
         f"plain GRPO and the classifier, {' '.join(r['make_run_flags'])}: "
         f"{'met' if r['make_run_s'] <= r['make_run_limit_s'] else 'NOT met'} (within 60 s, or within the "
         f"yardstick where it is over 60 s)"),
    ]
    print(f"\n{r['machine']}")
    print(f"{'measure':<26} {'value':>18} {'target':>9}  detail")
    for name, value, target, detail in rows:
        print(f"{name:<26} {value:>18} {target:>9}  {detail}")
    print("threads: " + "; ".join(f"{n}: rollout {v['rollout_steps_per_s']:.0f} steps/s, update "
                                  f"{v['update_samples_per_s']:.0f} samples/s" for n, v in r["threads"].items()))
    print("forward samples/s by batch: " + ", ".join(f"{k}: {v:.0f}" for k, v in
                                                    r["forward_samples_per_s_by_batch"].items()))
    split = r["default_run_split"]
    print(f"the classifier run at the defaults: {split['update_s']:.1f} s in updates, over {split['pg_samples']} "
          f"policy-gradient samples and {split['cls_samples']} labelled samples of the classifier's stream; "
          f"{split['outside_loop_s']:.1f} s outside the loop (start-up, the cold start, plots)")


def main():
    p = argparse.ArgumentParser(prog="python -m studies.bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=g.Config.threads, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="results/bench.json")
    p.add_argument("--iters", type=int, help="short (make smoke): the default run's and the memory run's "
                   "iterations, memory measured from iteration 1 (default: the default run's; 5 -> 50)")
    args = p.parse_args()
    mem = (5, 50) if args.iters is None else (1, args.iters)  # memory growth from and to these iterations
    tmp = tempfile.mkdtemp(prefix="grpo_cls_bench_")
    base = g.Config(cls_weight=0.5, threads=args.threads, device=args.device, out=tmp, quiet=True)
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, {args.device}, {args.threads} threads",
              "config": "grpo_cls.py defaults with --cls-weight 0.5"}

    print("1/6 rollout and update against their ceilings ...", flush=True)
    device, tok, policy, gen, rng, envs_ = setup(base)
    roll = measure_rollout(base, device, tok, policy, gen, rng, envs_)
    batch = roll.pop("batch")
    upd = measure_update(base, device, policy, gen, batch)
    report |= roll | upd
    print("2/6 batched vs naive, batch-size sweep ...", flush=True)
    report["naive_steps_per_s"] = measure_naive(base, device, tok, policy, gen, envs_)
    report["batched_speedup"] = report["rollout_steps_per_s"] / report["naive_steps_per_s"]
    report["forward_samples_per_s_by_batch"] = measure_batch_sweep(policy, batch, device)
    print("3/6 scaling with tasks-per-iter x G ...", flush=True)
    report["scaling"] = measure_scaling(base)

    print("4/6 a classifier run at the defaults (the yardstick), then make run's pair ...", flush=True)
    run_args = ["--cls-weight", "0.5", "--threads", str(args.threads), "--device", args.device]
    run_args += [] if args.iters is None else ["--iters", str(args.iters)]  # the memory run's --iters comes later
    seconds, summary, metrics, peak_default = run_subprocess(run_args, os.path.join(tmp, "default"))
    it_rows = [m for m in metrics if m["iter"] > 0]
    phases = {k: sum(m[f"time_{k}_s"] or 0 for m in it_rows) for k in ("rollout", "update", "eval", "diag")}
    train_s = it_rows[-1]["wall_s"] - metrics[0]["wall_s"]
    steps_each = np.diff([m["env_steps"] for m in metrics])  # env steps of each iteration's batch
    report["default_run_split"] = time_split(seconds, it_rows, phases, steps_each)
    report |= {"default_run_s": seconds, "default_success_rate": summary["success_rate"],
               "env_steps_per_s": summary["env_steps"] / train_s,
               "time_share": {k: v / train_s for k, v in phases.items()} | {"other": 1 - sum(phases.values()) / train_s}}
    report["eval_and_diag_share"] = report["time_share"]["eval"] + report["time_share"]["diag"]
    # end-to-end: the same env steps and update samples, at the two ceilings. This machine's speed drifts
    # by up to 30% an hour, so the ceilings are measured again right after the run, and the run is set
    # against their mean: a drift that is linear over the bracket cancels.
    after = measure_rollout(base, device, tok, policy, gen, rng, envs_)
    after |= measure_update(base, device, policy, gen, after.pop("batch"))
    steps = summary["env_steps"]
    update_samples = sum(processed_samples(m, int(n)) for m, n in zip(it_rows, steps_each))

    def ideal_s(rollout_ceiling, bare_update):
        return steps / rollout_ceiling + update_samples / bare_update
    before_s = ideal_s(report["rollout_ceiling"], report["bare_update_samples_per_s"])
    after_s = ideal_s(after["rollout_ceiling"], after["bare_update_samples_per_s"])
    report |= {"end_to_end_efficiency": (before_s + after_s) / 2 / train_s,
               "end_to_end_before_after": [before_s / train_s, after_s / train_s],
               "R_forward_before_after": [report["R_forward"], after["R_forward"]]}

    report |= time_pair(args, os.path.join(tmp, "pair"), seconds)  # after the ceilings that bracket the yardstick
    print(f"5/6 memory after {mem[0]} and {mem[1]} iterations ...", flush=True)
    _, _, metrics50, _ = run_subprocess(run_args + ["--iters", str(mem[1])], os.path.join(tmp, "it50"))
    peak = {m["iter"]: m["peak_rss_mib"] for m in metrics50}  # the process's high-water mark at each iteration
    torch_rss = torch_baseline_rss_mib()
    report |= {"rss_torch_import_mib": torch_rss, "rss_5_iters_mib": peak[mem[0]] - torch_rss, "rss_50_iters_mib":
               peak[mem[1]] - torch_rss, "mem_growth": (peak[mem[1]] - peak[mem[0]]) / (peak[mem[0]] - torch_rss)}

    print("6/6 threads: rollout and update rates at 1 and 2 threads ...", flush=True)
    report["threads"] = {}
    for n in (1, 2):
        cfg = g.Config(**{**base.__dict__, "threads": n})
        device, tok, policy, gen, rng, envs_ = setup(cfg)
        r = measure_rollout(cfg, device, tok, policy, gen, rng, envs_)
        u = measure_update(cfg, device, policy, gen, r.pop("batch"))
        report["threads"][n] = {"rollout_steps_per_s": r["rollout_steps_per_s"],
                                "update_samples_per_s": u["update_samples_per_s"]}

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=float)
    print_table(report, mem)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

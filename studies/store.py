"""Run storage the studies share: the tasks and arms a matrix trains; one cold start per (task, seed)
that every arm of that seed starts from; worker processes; finished runs recognised, re-checked, and
stored compressed under results/runs/ so that a matrix resumes on another machine and its tables come
back without training; and the command line every stored-run matrix takes."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np
import torch

import grpo_cls as g
from studies import arms

TASKS = {  # name -> the Config fields of the task
    "text": {"env": "text"},
    "grid": {"env": "grid"},
    "text-nomask": {"env": "text", "action_mask": "none"},  # Kitchen as an LLM agent plays it: all 33 commands
    "text-mlm": {"env": "text", "pretrain": "mlm"},  # twins start nearly identical (studies/regime.py)
    "text-weak": {"env": "text", "sft_steps": 100},  # a weak cold start: flawed actions start likely
    "empty": {"env": "MiniGrid-Empty-5x5-v0"},  # the MiniGrid rooms (worlds.minigrid.OracleMiniGrid; pip install minigrid)
    "lavagap": {"env": "MiniGrid-LavaGapS5-v0"},
    "doorkey": {"env": "MiniGrid-DoorKey-5x5-v0"},
    "textworld": {"env": "TextWorld-Small-v0"},  # TextWorld games from stored tables (worlds.textworld)
}
ARMS = {  # name -> the Config fields that differ from plain GRPO
    "plain": {},
    "cls-advantage": {"cls_weight": 0.5, "cls_labels": "advantage"},
    "cls-oracle": {"cls_weight": 0.5, "cls_labels": "oracle"},
    "cls-step": {"cls_weight": 0.5, "cls_labels": "step"},
    "gigpo": {"adv": "gigpo"},
    "cls-loop": {"cls_weight": 0.5, "cls_labels": "loop"},
    "shape-oracle": {"shaping": "oracle"},  # the same labels as cls-oracle, carried by the reward
    "shape-loop": {"shaping": "loop"},
    "shape-oracle-lambda0.2": {"shaping": "oracle", "shaping_lambda": 0.2},
    "repel": {"cls_weight": 0.5, "cls_channel": "repel"},  # the representation alone: no labels
    "place-high": {"cls_weight": 0.5, "cls_labels": "oracle", "cls_placement": "high"},  # label placement
    "place-low": {"cls_weight": 0.5, "cls_labels": "oracle", "cls_placement": "low"},
}
ITERS = 60  # the stored-run matrices' runs (results/PROTOCOL.md)
PAIRS = 128
STORE = "results/runs/coupling"


# ---------------------------------------------------------------------------------------------
# Runs: one shared cold start per (task, seed), then every arm from it
# ---------------------------------------------------------------------------------------------

def arm_config(task: str, seed: int, overrides: dict, iters: int, out: str):
    """The default config but for the arm, the length, one thread, and one evaluation, at the end (the
    evaluations never touch the training's random streams, so this changes no training step)."""
    fields = TASKS[task] | {"seed": seed, "iters": iters, "eval_every": iters, "threads": 1, "quiet": True,
                            "overwrite": True, "no_plots": True, "out": out}
    return arms.ArmConfig(**(fields | overrides))  # an arm's overrides come last (replicate.py's evaluation every 10)


def cold_start_checkpoint(cfg) -> None:
    """What train() does before its first iteration: cold start, evaluate, save the iteration-0
    checkpoint, here into cfg.out."""
    device, tok, policy, gen, rng = arms.build(cfg)
    train_envs = g.make_envs(cfg, cfg.tasks_per_iter * cfg.num_generations)
    evaluation = g.Evaluation(cfg, tok, device, *g.probes_and_pairs(cfg, train_envs[0]))
    run = g.RunState(cfg, policy, torch.optim.Adam(policy.parameters(), lr=cfg.lr), None, gen, rng,
                     cls_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1))
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    if cfg.pretrain != "none":
        arms.pretrain_trunk(policy, cfg, tok, train_envs, device, cfg.pretrain)
    g.cold_start(policy, cfg, train_envs, tok, rng, gen, device)
    row = {"iter": 0, "env_steps": 0} | {k: None for k in arms.ROW_KEYS} | evaluation(policy, 0)
    run.metrics.append(row | {"wall_s": round(time.time() - t0, 3)})
    g.save_checkpoint(run)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:  # what is_done() compares
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def from_cold_start(init: dict, cfg) -> dict:
    """The shared iteration-0 checkpoint, fitted to this arm (grpo_cls.fit_cold_start, with the arm's own
    policy class)."""
    return g.fit_cold_start(init, cfg, arms.build(cfg)[2])


def run_job(job: tuple) -> tuple:
    """One unit of work in a worker process: ("init", cfg fields) or ("arm", cfg fields, init folder)."""
    kind, fields = job[0], job[1]
    cfg = arms.ArmConfig(**fields)
    if kind == "init":
        cold_start_checkpoint(cfg)
    else:
        init = g.load_checkpoint(job[2])
        arms.train(cfg, from_cold_start(init, cfg))
    return job


def is_done(fields: dict, last_file: str = "summary.json") -> bool:
    """A finished run (or cold start) of exactly this config: a changed arm, length or seed is run
    again, never mixed in. config.json records the device and thread count actually used."""
    try:
        saved = json.load(open(os.path.join(fields["out"], "config.json")))
    except (OSError, ValueError):
        return False
    # a field added to Config after the run was saved counts at its default (defaults keep the old code path);
    # a field that cannot change this run is not compared (a plain run has no classifier labels)
    idle = {"overwrite", "device", "threads", "baseline"}
    idle |= {"cls_labels", "cls_design", "cls_channel"} if fields["cls_weight"] == 0 else set()
    idle |= {"shaping_lambda"} if fields.get("shaping", "none") == "none" else set()
    same = all(saved.get(k, getattr(arms.ArmConfig, k, None)) == v for k, v in fields.items() if k not in idle)
    if not same or not os.path.isfile(os.path.join(fields["out"], last_file)):
        return False
    if last_file != "summary.json":  # a cold start: the update never ran, so its version cannot matter
        return True
    if saved.get("update", 1) != g.UPDATE_VERSION:  # trained by another grpo_update (one joint clip)
        return False
    with open(os.path.join(fields["out"], "metrics.jsonl")) as f:  # and it reached its last iteration
        return json.loads(f.read().splitlines()[-1])["iter"] == fields["iters"]


def run_all(jobs: list[tuple], workers: int, desc: str):
    """Run the jobs on `workers` single-thread processes, with a progress bar."""
    from tqdm import tqdm
    if not jobs:
        return
    ctx = mp.get_context("spawn")  # fresh interpreters: no torch state or thread pool is forked
    with ctx.Pool(workers) as pool, tqdm(total=len(jobs), desc=desc, unit="run") as bar:
        for _ in pool.imap_unordered(run_job, jobs):
            bar.update()


def seed_list(text: str) -> list[int]:
    """'1-5' or '9101-9108,9120' -> the seeds, in order."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def calibrate(args, labels: str = "oracle", tasks=("text", "grid")) -> dict:
    """The policy channel's weight per task: the median over development seeds 1-5 of the ratio of the two
    side streams' gradient norms on the shared parameters at iteration 1 (cls_pg_grad_ratio, each over
    the same policy gradient), the classifier at 0.5 against the policy channel at 1, both on `labels`.
    Trains 1 iteration. Returns task -> weight."""
    import dataclasses
    import json
    import tempfile
    seeds = seed_list("1-5")
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"head": {"cls_weight": 0.5, "cls_labels": labels},
                 "policy": {"cls_weight": 1.0, "cls_labels": labels, "cls_channel": "policy"}}
        jobs, cells = [], []
        for t in tasks:
            for s in seeds:
                init = os.path.join(tmp, f"init-{t}-{s}")
                jobs.append(("init", dataclasses.asdict(arm_config(t, s, {"twin_pairs": 0}, 1, init))))
                for name, over in sides.items():
                    out = os.path.join(tmp, f"{t}-{name}-{s}")
                    cells.append((t, name, s, out, ("arm", dataclasses.asdict(
                        arm_config(t, s, over | {"twin_pairs": 0, "baseline": "none"}, 1, out)), init)))
        os.environ["OMP_NUM_THREADS"] = "1"
        run_all(jobs, args.workers, "cold starts")
        run_all([x[4] for x in cells], args.workers, "1-iteration runs")
        ratio = {(t, name, s): json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[1])
                 ["cls_pg_grad_ratio"] for t, name, s, out, _ in cells}
    weights = {}
    for t in tasks:
        r = [ratio[(t, "head", s)] / ratio[(t, "policy", s)] for s in seeds]
        weights[t] = float(np.median(r))
        print(f"{t}: head/policy shared-gradient ratio per seed {', '.join(f'{x:.3f}' for x in r)}; "
              f"median {np.median(r):.3f} -> policy channel weight {np.median(r):.3g}")
    return weights


def recheck(run: str, init: str) -> int:
    """Train a stored run again from its cold start, with this code, in a temporary folder, and compare
    every metrics.jsonl field but the clocks and memory. 0 if all match (the run can be reused)."""
    import tempfile
    if not os.path.isfile(os.path.join(run, "metrics.jsonl")):  # a fresh machine: nothing will be reused
        print(f"{run}: no stored run, nothing to check")
        return 0
    saved = json.load(open(os.path.join(run, "config.json")))
    if saved.get("update", 1) != g.UPDATE_VERSION:  # is_done re-runs it: there is nothing to reuse or check
        print(f"{run}: trained by update {saved.get('update', 1)}, not {g.UPDATE_VERSION}; it will be re-run, "
              f"not reused")
        return 0
    names = {f.name for f in dataclasses.fields(arms.ArmConfig)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = arms.ArmConfig(**{k: v for k, v in saved.items() if k in names} | {"out": tmp, "overwrite": True})
        arms.train(cfg, from_cold_start(g.load_checkpoint(init), cfg))
        fresh = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
    stored = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    clock = lambda k: k in ("wall_s", "rss_mib", "peak_rss_mib") or k.startswith("time_")  # noqa: E731
    differ = sorted({k for a, b in zip(stored, fresh) for k in a if not clock(k) and a[k] != b.get(k)}
                    | ({"rows"} if len(stored) != len(fresh) else set()))
    new = sorted({k for b in fresh for k in b} - {k for a in stored for k in a})  # logged since the run was stored
    verdict_text = f"differs in {', '.join(differ)}" if differ else "every stored field identical (clocks aside)"
    print(f"{run}: {len(fresh)} rows, {verdict_text}" + (f"; not in the stored run: {', '.join(new)}" if new else ""))
    return 1 if differ else 0


def update_doc(block: str, marker: str, path: str = "docs/claim4.md", writer: str = "compare.py"):
    """Replace the text between the doc's `marker` markers with `block`."""
    begin, end = f"<!-- {marker}:begin (written by {writer}) -->", f"<!-- {marker}:end -->"
    text = open(path).read()
    if begin not in text or end not in text:
        print(f"note: {path} has no {marker} markers; the report is in the results folder only", file=sys.stderr)
        return
    head, rest = text.split(begin)
    open(path, "w").write(head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1])


# ---------------------------------------------------------------------------------------------
# Stored runs: results/runs/coupling/<task>-<arm>-seed<s>/ and init/<task>-seed<s>/
# ---------------------------------------------------------------------------------------------

def arm_overrides(task: str, arm: str, seed: int) -> dict:
    """The Config fields of an arm beyond the task's; every arm logs the same PAIRS pairs."""
    over = {"twin_pairs": PAIRS, "baseline": "none"}
    if arm == "cls-oracle":
        over |= ARMS["cls-oracle"]
    if arm == "withhold":  # Kitchen only: a random half of the training goals, drawn by the seed, never trained
        over |= {"env_kwargs": json.dumps({"withhold": seed})}
    return over


def is_stored(dest: str) -> bool:
    return os.path.isfile(os.path.join(dest, "config.json"))  # a stored folder is complete or absent


RUN_NAMES = ("config.json", "summary.json", "metrics.jsonl.gz", "placement.json")  # a finished run
OPTIONAL_NAMES = ("placement.json",)  # only --cls-placement's runs have it: their split of the training pairs


def store(run: str, dest: str, names: tuple):
    """Copy `names` from a run folder into dest, .gz ones compressed, all or nothing: written into a
    temporary folder, renamed into place last."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in names:
        if name in OPTIONAL_NAMES and not os.path.exists(os.path.join(run, name)):
            continue
        if name.endswith(".gz"):
            with open(os.path.join(run, name[:-3]), "rb") as f, \
                    gzip.GzipFile(os.path.join(tmp, name), "wb", mtime=0) as out:  # the same bytes every time
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(os.path.join(run, name), os.path.join(tmp, name))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


INIT_NAMES = ("config.json", "checkpoint.pt")  # a cold start: the weights every arm of its seed starts from


def unpack(stored: str, run: str):
    """The other way: a stored run or cold start into a run folder, where is_done finds it."""
    os.makedirs(run, exist_ok=True)
    for name in os.listdir(stored):
        if name.endswith(".gz"):
            with gzip.open(os.path.join(stored, name), "rb") as f, open(os.path.join(run, name[:-3]), "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(os.path.join(stored, name), os.path.join(run, name))


def load_rows(stored: str) -> list[dict]:
    with gzip.open(os.path.join(stored, "metrics.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f]


def load_store(store_dir: str, arms_of: dict, seeds: list[int], overrides) -> tuple[dict, int]:
    """(task, arm, seed) -> metric rows of every stored run the matrix asks for, and their one length.
    A stored run whose config is not the arm's stops the report."""
    runs, iters = {}, set()
    for t, names in arms_of.items():
        for a in names:
            for s in seeds:
                d = os.path.join(store_dir, f"{t}-{a}-seed{s}")
                if not is_stored(d):
                    continue
                saved, want = json.load(open(os.path.join(d, "config.json"))), overrides(t, a, s)
                wrong = [k for k, v in (want | {"seed": s}).items() if k != "baseline" and saved.get(k) != v]
                if wrong:
                    sys.exit(f"coupling.py: {d} is not the run this matrix asks for ({', '.join(wrong)} differ)")
                runs[(t, a, s)], _ = load_rows(d), iters.add(saved["iters"])
    if not runs:
        sys.exit(f"coupling.py: no stored runs in {store_dir}; run the matrix's make target")
    if len(iters) > 1:
        sys.exit(f"coupling.py: the stored runs have different lengths ({sorted(iters)})")
    return runs, iters.pop()


# ---------------------------------------------------------------------------------------------
# A stored-run matrix: its flags, and training what is not stored yet
# ---------------------------------------------------------------------------------------------

def add_matrix_args(p: argparse.ArgumentParser, seeds: str, report: str, doc: str | None):
    """The flags every stored-run matrix takes (coupling.py, channels.py, repaired.py, replicate.py); --no-doc
    where the matrix writes a doc's block."""
    p.add_argument("--seeds", default=seeds, help="seeds of every cell; verdicts come from the protocol's")
    p.add_argument("--iters", type=int, default=ITERS, help="GRPO iterations per run")
    p.add_argument("--tables", action="store_true", help=f"train nothing: {report} from --store")
    p.add_argument("--store", default=STORE, help="folder of the stored runs (read, and written after each run)")
    p.add_argument("--runs", default="runs/coupling", help="folder of the working run folders")
    p.add_argument("--out", default="results", help=f"folder for {report}")
    p.add_argument("--workers", type=int, default=2, help="single-thread worker processes (2 cores: 2)")
    if doc:
        p.add_argument("--no-doc", action="store_true", help=f"do not rewrite {doc}'s block")


def checked_matrix_args(p: argparse.ArgumentParser, args):
    """--seeds parsed into a list; one-line errors for what cannot run."""
    try:
        args.seeds = seed_list(args.seeds)
    except ValueError:
        p.error("--seeds takes a list like '8201-8210' or '8201,8203'")
    if len(args.seeds) < 2 or args.iters < 1 or args.workers < 1:
        p.error("--seeds needs two seeds; --iters and --workers must be >= 1")
    return args


def run_or_report(job: tuple) -> tuple:
    """run_job in a worker, with a failure returned rather than raised: one run that fails
    (a non-finite loss, say) is reported as missing and the matrix goes on."""
    try:
        return run_job(job), None
    except Exception as e:  # noqa: BLE001  (any failure of one run)
        return job, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def work_and_stored(args, name: str) -> tuple[str, str]:
    """A run's working folder under --runs and its stored copy under --store."""
    return os.path.join(args.runs, name), os.path.join(args.store, name)


def cell_dirs(args, task: str, arm: str, seed: int) -> tuple[str, str]:
    return work_and_stored(args, f"{task}-{arm}-seed{seed}")


def init_dirs(args, task: str, seed: int) -> tuple[str, str]:
    return work_and_stored(args, os.path.join("init", f"{task}-seed{seed}"))


def job_fields(args, task: str, seed: int, overrides: dict, out: str) -> dict:
    return dataclasses.asdict(arm_config(task, seed, overrides, args.iters, out))


def train_missing(args, arms_of: dict, overrides) -> float:
    """Run every cell not yet stored, in seed order; store each run as it finishes. Returns the minutes.
    arms_of: task -> arm names; overrides(task, arm, seed) -> the arm's Config fields."""
    import multiprocessing as mp
    from tqdm import tqdm
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it: two 2-thread processes on 2 cores collapse
    t0 = time.time()
    cells = [(t, a, s) for s in args.seeds for t in arms_of for a in arms_of[t]]
    starts = list(dict.fromkeys((t, s) for t, _, s in cells))
    for run, stored in [init_dirs(args, *x) for x in starts] + [cell_dirs(args, *x) for x in cells]:
        if is_stored(stored) and not os.path.isfile(os.path.join(run, "config.json")):
            unpack(stored, run)  # a stored run resumes the matrix on a new machine
    inits = [("init", job_fields(args, t, s, {"twin_pairs": PAIRS}, init_dirs(args, t, s)[0])) for t, s in starts]
    todo = [j for j in inits if not is_done(j[1], "checkpoint.pt")]
    run_all(todo, args.workers, "cold starts")
    redone = {j[1]["out"] for j in todo}
    for x in starts:
        if not is_stored(init_dirs(args, *x)[1]) or init_dirs(args, *x)[0] in redone:
            store(*init_dirs(args, *x), INIT_NAMES)
    jobs = [("arm", job_fields(args, t, s, overrides(t, a, s), cell_dirs(args, t, a, s)[0]), init_dirs(args, t, s)[0])
            for t, a, s in cells]
    todo_arms = [j for j in jobs if j[2] in redone or not is_done(j[1])]  # a new cold start redoes its arms
    stored_as = dict(cell_dirs(args, *x) for x in cells)
    with mp.get_context("spawn").Pool(args.workers) as pool, \
            tqdm(total=len(todo_arms), desc="runs", unit="run") as bar:
        for job, failed in pool.imap_unordered(run_or_report, todo_arms):
            if failed:
                print(f"coupling.py: {job[1]['out']} failed ({failed}); it is reported as missing", file=sys.stderr)
            else:
                store(job[1]["out"], stored_as[job[1]["out"]], RUN_NAMES)
            bar.update()
    for j in jobs:  # finished in a run folder before it could be stored
        if j not in todo_arms and not is_stored(stored_as[j[1]["out"]]):
            store(j[1]["out"], stored_as[j[1]["out"]], RUN_NAMES)
    return (time.time() - t0) / 60


def train_or_exit(args, arms_of: dict, overrides, script: str):
    """train_missing, with the minutes it took printed; Ctrl-C exits in one line (every finished run is kept)."""
    try:
        minutes = train_missing(args, arms_of, overrides)
        print(f"{script}: trained what was missing in {minutes:.1f} min")
    except KeyboardInterrupt:
        sys.exit(f"{script}: interrupted; {args.store} keeps every finished run, and the same command skips them")


def write_report(path: str, text: str):
    """Write a study's report and echo it, as every study's command does."""
    with open(path, "w") as f:
        f.write(text)
    print(text, end="")
    print(f"wrote {path}")

"""Every make target on a short setting: make smoke   (python -m studies.smoke [--only TARGET] [--keep])

Each row of `rows` is one command of a Makefile target (make test aside: it is the test suite itself; make
bridge and make test-bridge aside too: they need the optional .venv-bridge): the same module and flags as
its Makefile line, plus flags that shorten it (2 iterations, two seeds, a small evaluation) and flags that
send everything it writes (runs, stored runs, reports, docs blocks, figures,
json) into one temporary folder. results/, docs/ and runs/ are never written: the script checks it.
A target's rows run in order and the targets run in the table's order, so a later target uses what an
earlier one made there, as make would: figures copies the short run's figures, run is set beside the
short reference, recheck and matrix-cure use the short matrix's runs, channels and repaired reuse the
short coupling matrix's stored runs. make headstart and make tables read the stored runs in results/runs/ (no
training).
Prints each target's time and PASS or FAIL (with the end of its log); exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the Makefile is
PY = sys.executable
WATCHED = ("results", "docs", "runs")  # the repository's outputs, which a smoke run must leave as they are
NEEDS = {"figures": ["run"], "recheck": ["matrix"], "matrix-cure": ["recheck"]}


def study(name: str, *args: str) -> list[str]:
    return [PY, "-m", f"studies.{name}", *args]


def rows(tmp: str) -> list[tuple[str, list[str]]]:
    """(make target, argv) in the Makefile's order of use; the short flags come after the Makefile's own."""
    R, D, S, T = f"{tmp}/results", f"{tmp}/docs", f"{tmp}/runs", f"{tmp}/tables"  # results/, docs/, runs/
    short = ["--iters", "2", "--eval-tasks", "16"]  # a grpo_cls.py or studies.arms run
    ref, run, ref_dest = f"{S}/reference-text-plain-seed1", f"{S}/text-cls0.5-seed1", f"{R}/reference/text-plain-seed1"
    opt = ["--cls-weight", "0.5", "--overwrite", "--quiet", "--no-plots", "--baseline", "none", *short]
    fair = ["--iters", "2", "--seeds", "7101-7102", "--coupling-seeds", "7109", "--name", "fair",
            "--runs", f"{S}/compare-fair", "--out", R, "--doc-file", f"{D}/claim4.md"]
    cure = ["--iters", "2", "--seeds", "7101-7102", "--runs", f"{S}/compare-fair", "--no-stage2",
            "--doc-file", f"{D}/cure.md", "--out", R]
    recheck = [f"{S}/compare-fair/text-plain-seed7101", f"{S}/compare-fair/init/text-seed7101"]
    recheck2 = [f"{S}/compare-fair/grid-cls-oracle-seed7101", f"{S}/compare-fair/init/grid-seed7101"]
    pairs = ["--iters", "2", "--seeds", "8201-8202", "--store", f"{tmp}/store/coupling", "--runs", f"{S}/coupling",
             "--out", R, "--no-doc"]
    rooms = ["--iters", "2", "--store", f"{tmp}/store/minigrid", "--runs", f"{S}/minigrid", "--out", R, "--no-doc"]
    tables = ["--tables", "--out", T, "--no-doc"]
    return [
        ("reference", [PY, "grpo_cls.py", "--cls-weight", "0", "--baseline", "none", "--no-plots", "--quiet",
                       "--overwrite", *short, "--out", ref]),
        ("reference", ["mkdir", "-p", ref_dest]),
        ("reference", ["cp", f"{ref}/config.json", f"{ref}/metrics.jsonl", f"{ref}/summary.json", ref_dest]),
        ("run", [PY, "grpo_cls.py", "--cls-weight", "0.5", "--vs-plain", "--iters", "25", "--tasks-per-iter", "12",
                 "--overwrite", *short, "--out", run]),
        ("regime", study("regime", "--seeds", "1", "--out", R)),
        ("mechanism", study("mechanism", "--iters", "2", "--seeds", "1-2", "--extra-seeds", "",
                            "--store", f"{tmp}/store/mechanism", "--runs", f"{S}/mechanism", "--out", R,
                            "--endpoint-from", "1")),
        ("demo", study("demo", "--seeds", "9101", "--iters", "2", "--store", f"{tmp}/store/demo", "--work",
                       f"{S}/demo", "--out", R)),
        ("figures", ["mkdir", "-p", D]),
        ("figures", ["cp", f"{run}/curves.png", f"{run}/coupling.png", f"{run}/probe_heatmap.png",
                     f"{run}/vs_plain.png", D]),
        ("bench", study("bench", "--iters", "2", "--out", f"{R}/bench.json")),
        ("claims", study("claims", "--iters", "2", "--seeds", "1-2", "--out", R)),
        ("optimizer", study("arms", *opt, "--out", f"{S}/optimizer/text-cls0.5-seed1")),
        ("optimizer", study("arms", *opt, "--env", "grid", "--out", f"{S}/optimizer/grid-cls0.5-seed1")),
        ("optimizer", study("claims", "--optimizer", f"{S}/optimizer/text-cls0.5-seed1",
                            f"{S}/optimizer/grid-cls0.5-seed1", "--out", R)),
        ("compare", study("compare", "--iters", "2", "--seeds", "1-2", "--runs", f"{S}/compare", "--out", R,
                          "--doc-file", f"{D}/claim4.md", "--doc-block", "compare")),
        ("matrix", study("compare", *fair, "--no-stage2")),
        ("matrix-stage2", study("compare", *fair)),
        ("recheck", study("compare", "--recheck", *recheck)),
        ("recheck", study("compare", "--recheck", *recheck2)),
        ("matrix-cure", study("compare", *cure, "--tasks", "text,grid,text-nomask", "--name", "cure",
                              "--arms", "plain,cls-advantage,cls-loop,cls-oracle,shape-loop,shape-oracle")),
        ("matrix-lambda", study("compare", *cure, "--tasks", "text", "--name", "lambda",
                                "--arms", "plain,cls-oracle,shape-oracle,shape-oracle-lambda0.2")),
        ("coupling", study("coupling", *pairs)),
        ("explain", study("explain", "--out", D)),
        ("channels", study("channels", *pairs, "--endpoint-from", "1")),
        ("repaired", study("repaired", *pairs, "--endpoint-from", "1")),
        ("minigrid-solve", study("replicate", "--solve", *rooms)),
        ("minigrid", study("replicate", *rooms, "--seeds", "8301-8302")),
        ("textworld-solve", study("textgame", "--solve", "--iters", "2", "--store", f"{tmp}/store/textworld",
                                  "--runs", f"{S}/textworld", "--out", R)),
        ("textworld", study("textgame", "--iters", "2", "--seeds", "8601-8602", "--store", f"{tmp}/store/textworld",
                            "--runs", f"{S}/textworld", "--out", R)),
        ("headstart", study("headstart", "--out", R)),
        ("tables", study("coupling", *tables)),
        ("tables", study("channels", *tables)),
        ("tables", study("repaired", *tables)),
        ("tables", study("replicate", "--solve", *tables)),
        ("tables", study("replicate", *tables)),
        ("tables", study("headstart", "--out", T)),
        ("tables", study("demo", "--tables", "--out", T)),
        ("tables", study("mechanism", "--tables", "--out", T)),
        ("tables", study("textgame", "--solve", "--tables", "--out", T)),
        ("tables", study("textgame", "--tables", "--out", T)),
    ]


TARGETS = list(dict.fromkeys(target for target, _ in rows("")))


def with_needs(targets: list[str]) -> set[str]:
    """The targets and, as make would, those whose outputs they use (NEEDS), recursively."""
    out, todo = set(), list(targets)
    while todo:
        t = todo.pop()
        if t not in out:
            out.add(t)
            todo += NEEDS.get(t, [])
    return out


def snapshot() -> dict:
    """(size, mtime) of every file under WATCHED: what a smoke run must not change."""
    files = {}
    for top in WATCHED:
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                files[os.path.relpath(os.path.join(folder, name), ROOT)] = (st.st_size, st.st_mtime_ns)
    return files


def run_target(target: str, commands: list[list[str]], log_path: str) -> tuple[bool, float]:
    """The target's commands in order, output into log_path, stopping at the first that fails."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    t0 = time.time()
    with open(log_path, "w") as log:
        for argv in commands:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            if subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                return False, time.time() - t0
    return True, time.time() - t0


def tail(path: str, n: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.smoke", description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=TARGETS, metavar="TARGET",
                   help=f"run this target (and what it needs: {NEEDS}); repeatable. One of {', '.join(TARGETS)}")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (it is kept anyway on a failure)")
    args = p.parse_args(argv)
    chosen = with_needs(args.only) if args.only else set(TARGETS)
    tmp = tempfile.mkdtemp(prefix="grpo_cls_smoke_")
    shutil.copytree(os.path.join(ROOT, "docs"), os.path.join(tmp, "docs"))  # the docs whose blocks get written
    os.makedirs(os.path.join(tmp, "logs"))
    before, results, t0 = snapshot(), {}, time.time()
    print(f"smoke: {len(chosen)} of the {len(TARGETS)} make targets on a short setting, into {tmp}", flush=True)
    for target in [t for t in TARGETS if t in chosen]:
        log = os.path.join(tmp, "logs", f"{target}.log")
        ok, seconds = run_target(target, [a for t, a in rows(tmp) if t == target], log)
        results[target] = ok
        print(f"{target:<15} {seconds:7.1f} s  {'PASS' if ok else 'FAIL'}", flush=True)
        if not ok:
            print("    " + tail(log).replace("\n", "\n    ").rstrip(), flush=True)
    after = snapshot()
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    if changed:
        print(f"FAIL: the smoke run changed {len(changed)} files of the repository: " + ", ".join(changed[:10]))
    failed = [t for t, ok in results.items() if not ok]
    print(f"smoke: {len(results) - len(failed)} of {len(results)} targets passed in {time.time() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed or changed or args.keep:
        print(f"smoke: the outputs and logs are kept in {tmp}")
    else:
        shutil.rmtree(tmp)
    return 1 if failed or changed else 0


if __name__ == "__main__":
    sys.exit(main())

# The two commands are `make run` and `make test`; `make bridge` and `make test-bridge` run the optional bridge
# to TRL and verl (bridge/, in .venv-bridge); `make demo` (make run's pair on the registered seeds),
# `make regime` and `make mechanism` (where twins start; the mechanism matrix), `make bench`, `make claims`,
# `make optimizer`,
# `make compare`, the `make matrix*` targets, `make coupling`, `make channels`, `make repaired`,
# `make minigrid-solve`, `make minigrid`, `make headstart`, `make reference` and `make figures` make the
# README's numbers.
# grpo_cls.py (the method) and envs.py sit at the top; the studies behind the numbers live in studies/
# and run as modules from here (`python -m studies.coupling --tables`); `make tables` regenerates every
# table of the findings from the stored runs, `make explain` the walkthrough; `make smoke` runs every target
# on a short setting (2 iterations, two seeds) into a temporary folder, to show that each one still runs.
# Each target creates .venv from requirements.txt when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run demo regime mechanism test textworld-tables test-textworld textworld-solve textworld bridge test-bridge figures bench claims optimizer compare matrix matrix-stage2 recheck matrix-cure matrix-lambda coupling channels repaired minigrid-solve minigrid headstart tables explain reference smoke clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# MiniGrid is an optional extra: the MiniGrid rooms need it, the rest of the project does not
MINIGRID := minigrid==3.2.0
$(VENV)/.minigrid: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check -q $(MINIGRID)
	touch $(VENV)/.minigrid

# TextWorld is an optional extra: only building the stored tables (worlds/textworld/) and checking them against
# the live engine need it; training on the tables does not
TEXTWORLD := textworld==1.7.0
$(VENV)/.textworld: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check -q $(TEXTWORLD)
	touch $(VENV)/.textworld

# The bridge to TRL and verl (bridge/) is an optional extra with a venv of its own, .venv-bridge: verl's pins
# clash with TRL's, so verl comes without its dependencies, and the main venv stays as small as it is
BRIDGE := .venv-bridge
VERL   := verl==0.9.1
$(BRIDGE)/.installed: requirements.txt bridge/requirements.txt bridge/constraints.txt
	$(PYTHON) -m venv $(BRIDGE)
	$(BRIDGE)/bin/pip install --disable-pip-version-check -q -r requirements.txt -r bridge/requirements.txt \
		-c bridge/constraints.txt
	$(BRIDGE)/bin/pip install --disable-pip-version-check -q --no-deps $(VERL)
	touch $(BRIDGE)/.installed

run: $(STAMP)  ## the main job: plain GRPO, then GRPO + classifier from the same cold start, side by side (Kitchen)
	$(PY) grpo_cls.py --cls-weight 0.5 --vs-plain --iters 25 --tasks-per-iter 12 --overwrite

demo: $(STAMP)  ## make run's pair on the 10 registered fresh seeds (results/PROTOCOL.md): results/demo.md, ~8 min
	$(PY) -m studies.demo

regime: $(STAMP)  ## development (seeds 1-3): where the twins start, per trunk and cold start (results/regime-text.md), ~5 min
	$(PY) -m studies.regime

mechanism: $(STAMP)  ## the mechanism matrix (results/PROTOCOL.md): 3 regimes x 7 arms, ~4-5 h on 2 cores; resumes
	$(PY) -m studies.mechanism

test: $(STAMP) $(VENV)/.minigrid $(VENV)/.textworld  ## the whole test suite (test_grpo_cls.py, studies/, worlds/), MiniGrid's and the live TextWorld checks included, on two single-thread workers
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 test_grpo_cls.py studies/ worlds/

textworld-tables: $(VENV)/.textworld  ## generate the TextWorld family with tw-make and store its exact tables (worlds/textworld/, ~6 min); skips stored ones
	OMP_NUM_THREADS=1 $(PY) -m worlds.textworld_tables

test-textworld: $(VENV)/.textworld  ## the stored TextWorld tables against a live TextWorld engine (worlds/test_textworld_live.py)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider worlds/

bridge: $(BRIDGE)/.installed  ## GCDGRPOTrainer (bridge/trl_gcd.py) on a tiny local Qwen2: plain GRPO vs + verdict
	OMP_NUM_THREADS=1 $(BRIDGE)/bin/python -m bridge.example

test-bridge: $(BRIDGE)/.installed  ## the bridge's tests: TRL's GRPOTrainer plus the verdict, and parity with verl's GRPO
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BRIDGE)/bin/python -m pytest -q -p no:cacheprovider bridge/

figures: run  ## refresh docs/'s figures of a run (docs/run.md) from make run
	mkdir -p docs
	cp runs/text-cls0.5-seed1/curves.png runs/text-cls0.5-seed1/coupling.png runs/text-cls0.5-seed1/probe_heatmap.png \
		runs/text-cls0.5-seed1/vs_plain.png docs/

clean:
	rm -rf $(VENV) $(BRIDGE) runs .pytest_cache __pycache__ studies/__pycache__ worlds/__pycache__ bridge/__pycache__

bench: $(STAMP)  ## measure the trainer against this machine's ceilings; writes results/bench.json
	$(PY) -m studies.bench

claims: $(STAMP)  ## measure the paper's claims; writes results/claims.md, squeeze.png, probe_rise.png
	$(PY) -m studies.claims

OPT := --cls-weight 0.5 --overwrite --quiet --no-plots --baseline none
optimizer: $(STAMP)  ## the clip and Adam logs of the default classifier run on each task; writes results/optimizer.md
	$(PY) -m studies.arms $(OPT) --out runs/optimizer/text-cls0.5-seed1
	$(PY) -m studies.arms $(OPT) --env grid --out runs/optimizer/grid-cls0.5-seed1
	$(PY) -m studies.claims --optimizer runs/optimizer/text-cls0.5-seed1 runs/optimizer/grid-cls0.5-seed1

compare: $(STAMP)  ## claims 3b and 4, short: 20 iterations, seeds 1-5; writes results/compare.md and docs/claim4.md's block
	$(PY) -m studies.compare

matrix: $(STAMP)  ## the pre-registered matrix of results/PROTOCOL.md (claims 3b and 4, fresh seeds, 100 iterations)
	$(PY) -m studies.compare --iters 100 --seeds 7101-7108 --coupling-seeds 7109,7110 --name fair --no-stage2

matrix-stage2: $(STAMP)  ## stage 2 of the pre-registered matrix (weights, separate design), reusing stage 1
	$(PY) -m studies.compare --iters 100 --seeds 7101-7108 --coupling-seeds 7109,7110 --name fair

CURE := --iters 100 --seeds 7101-7108 --runs runs/compare-fair --no-stage2 --doc-file docs/cure.md
RECHECK := runs/compare-fair/text-plain-seed7101 runs/compare-fair/init/text-seed7101
RECHECK2 := runs/compare-fair/grid-cls-oracle-seed7101 runs/compare-fair/init/grid-seed7101
recheck: $(STAMP)  ## re-train two stored runs of make matrix; they must match before matrix-cure reuses them
	$(PY) -m studies.compare --recheck $(RECHECK) && $(PY) -m studies.compare --recheck $(RECHECK2)

matrix-cure: recheck  ## the decisive matrix (results/PROTOCOL.md): loop labels, the shaping control, no mask
	$(PY) -m studies.compare $(CURE) --tasks text,grid,text-nomask --name cure \
		--arms plain,cls-advantage,cls-loop,cls-oracle,shape-loop,shape-oracle

matrix-lambda: $(STAMP)  ## its sensitivity check: shaping at lambda 0.2, Kitchen
	$(PY) -m studies.compare $(CURE) --tasks text --name lambda --arms plain,cls-oracle,shape-oracle,shape-oracle-lambda0.2

coupling: $(STAMP)  ## claim 3b over sampled twin pairs (results/PROTOCOL.md): 50 runs, ~40 min; stores results/runs/coupling
	$(PY) -m studies.coupling

explain: $(STAMP)  ## one twin pair traced by hand, in about half a minute: writes docs/walkthrough.md and docs/walkthrough.png
	OMP_NUM_THREADS=1 $(PY) -m studies.explain

channels: $(STAMP)  ## what carries the cure (results/PROTOCOL.md): classifier, placebo, labels through the policy
	$(PY) -m studies.channels

repaired: $(STAMP)  ## the repaired loop labels (results/PROTOCOL.md): classifier and policy channel, three tasks
	$(PY) -m studies.repaired

textworld-solve: $(STAMP)  ## does GRPO train the TextWorld games? seed 1, 2 runs (results/textworld-solve.md)
	$(PY) -m studies.textgame --solve

textworld: $(STAMP)  ## the TextWorld replication of the dose-response (results/PROTOCOL.md): 32 runs, ~10 min on 2 cores
	$(PY) -m studies.textgame

minigrid-solve: $(VENV)/.minigrid  ## does GRPO train the MiniGrid rooms? seed 1, 6 runs (results/minigrid-solve.md)
	$(PY) -m studies.replicate --solve

minigrid: $(VENV)/.minigrid  ## the MiniGrid replication of the dose-response (results/PROTOCOL.md): 40 runs
	$(PY) -m studies.replicate

headstart: $(STAMP)  ## post hoc, from the stored runs (no training): the head start, the manipulation check, power (results/headstart.md)
	$(PY) -m studies.headstart

tables: $(VENV)/.minigrid  ## every table and figure of the findings, from the stored runs in results/runs/ (no training)
	$(PY) -m studies.coupling --tables
	$(PY) -m studies.channels --tables
	$(PY) -m studies.repaired --tables
	$(PY) -m studies.replicate --solve --tables
	$(PY) -m studies.replicate --tables
	$(PY) -m studies.headstart
	$(PY) -m studies.demo --tables
	$(PY) -m studies.mechanism --tables
	$(PY) -m studies.textgame --solve --tables
	$(PY) -m studies.textgame --tables

REF := runs/reference-text-plain-seed1
reference: $(STAMP)  ## the stored plain-GRPO run a lone classifier run is set beside (results/reference, --baseline auto)
	$(PY) grpo_cls.py --cls-weight 0 --baseline none --no-plots --quiet --overwrite --out $(REF)
	mkdir -p results/reference/text-plain-seed1
	cp $(REF)/config.json $(REF)/metrics.jsonl $(REF)/summary.json results/reference/text-plain-seed1/

smoke: $(VENV)/.minigrid  ## every make target on a short setting (into a temporary folder; about 20 min on 2 cores)
	$(PY) -m studies.smoke

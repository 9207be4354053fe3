"""The MiniGrid rooms: the search's model of MiniGrid, its plans and its oracle, held to brute force
with MiniGrid's own step; the words the policy reads; the twin pairs; MiniGrid as an optional install.

Run: OMP_NUM_THREADS=1 python -m pytest -q -p no:xdist test_minigrid.py
"""

import ast
import copy
import importlib.util
import pathlib
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import grpo_cls as g

needs_minigrid = pytest.mark.skipif(importlib.util.find_spec("minigrid") is None, reason="pip install minigrid")
ROOMS = [f"grpo_cls/{name}" for name in envs.MINIGRID_ROOMS]  # Empty-5x5, LavaGapS5, DoorKey-5x5


def noisy_action(env, rng, noise: float) -> int:
    """The scripted agent: a random action with chance `noise`, else the oracle's optimal one."""
    return int(rng.integers(envs.N_ACTIONS)) if rng.random() < noise else env.unwrapped.optimal_action()


def minigrid_key(room) -> tuple:
    """Everything MiniGrid's step reads, from MiniGrid's own encoding (not the search's RoomState)."""
    holding = None if room.carrying is None else (room.carrying.type, room.carrying.color)
    return room.grid.encode().tobytes(), tuple(room.agent_pos), room.agent_dir, holding


def brute_force_plan_length(room, limit: int) -> int | None:
    """The fewest actions that reach the goal, by trying every action sequence of length 0, 1, ..., limit
    with MiniGrid's own step on copies of `room`. Sequences that reach one MiniGrid state have the same
    futures, so each length keeps one copy per state. None: no success within `limit`."""
    level, seen = [room], {minigrid_key(room)}
    for length in range(limit + 1):
        if any(r.grid.get(*r.agent_pos) is not None and r.grid.get(*r.agent_pos).type == "goal" for r in level):
            return length
        nxt = []
        for r in level:
            if r.grid.get(*r.agent_pos) is not None and r.grid.get(*r.agent_pos).type == "lava":
                continue  # the episode ended
            for a in range(envs.N_ACTIONS):
                c = copy.deepcopy(r)
                c.step_count = 0  # the step budget is not part of the search
                c.step(a)
                if minigrid_key(c) not in seen:
                    seen.add(minigrid_key(c))
                    nxt.append(c)
        level = nxt
    return None


# ---------------------------------------------------------------------------------------------
# The search's model of MiniGrid
# ---------------------------------------------------------------------------------------------

@needs_minigrid
def test_action_and_heading_constants_are_minigrids():
    from minigrid.core.actions import Actions
    from minigrid.core.constants import DIR_TO_VEC
    assert [a.value for a in Actions] == [envs.LEFT, envs.RIGHT, envs.FORWARD, envs.PICKUP, envs.DROP,
                                          envs.TOGGLE, envs.DONE]
    assert [tuple(int(v) for v in d) for d in DIR_TO_VEC] == list(envs.HEADINGS)


@needs_minigrid
@pytest.mark.parametrize("env_id", ROOMS)
def test_room_step_predicts_minigrids_step_on_noisy_walks(env_id):
    """room_step, the search's transition, gives the true state MiniGrid's step reaches, for every action
    taken on noisy walks (keys picked up and dropped, doors unlocked, opened and closed, walls bumped)."""
    room = gym.make(env_id).unwrapped.room  # the MiniGrid env itself
    effects = set()
    for episode in range(20):
        room.reset(seed=episode)
        rng, done = np.random.default_rng(episode), False
        while not done:
            fixed, before = envs.read_room(room)
            a = int(rng.integers(envs.N_ACTIONS))
            predicted = envs.room_step(dict(fixed), before, a)
            _, _, term, trunc, _ = room.step(a)
            assert envs.read_room(room)[1] == predicted, f"seed {episode}: action {a} from {before}"
            effects.add((a, predicted != before))
            done = term or trunc
    changes = {a for a, changed in effects if changed}
    assert {envs.LEFT, envs.RIGHT, envs.FORWARD} <= changes and {envs.FORWARD, envs.DONE} <= {a for a, c in effects if not c}
    if "DoorKey" in env_id:
        assert {envs.PICKUP, envs.DROP, envs.TOGGLE} <= changes


# ---------------------------------------------------------------------------------------------
# Plans and the oracle, against brute force over MiniGrid's own step
# ---------------------------------------------------------------------------------------------

@needs_minigrid
@pytest.mark.parametrize("env_id,task", [("grpo_cls/MiniGrid-Empty-5x5-v0", 0),
                                         ("grpo_cls/MiniGrid-LavaGapS5-v0", 0),
                                         ("grpo_cls/MiniGrid-LavaGapS5-v0", 2),
                                         ("grpo_cls/MiniGrid-DoorKey-5x5-v0", 0),
                                         ("grpo_cls/MiniGrid-DoorKey-5x5-v0", 3)])
def test_shortest_plan_length_equals_brute_force(env_id, task):
    env = gym.make(env_id)
    env.reset(options={"task": task})
    plan = env.unwrapped.steps_to_go()
    assert brute_force_plan_length(env.unwrapped.room, limit=plan) == plan
    assert brute_force_plan_length(env.unwrapped.room, limit=plan - 1) is None


@needs_minigrid
def test_doorkey_5x5_plans_take_7_to_14_actions():
    env = gym.make("grpo_cls/MiniGrid-DoorKey-5x5-v0")
    plans = set()
    for task in range(100):
        env.reset(options={"task": task})
        plans.add(env.unwrapped.steps_to_go())
    assert min(plans) == 7 and max(plans) == 14


@needs_minigrid
@pytest.mark.parametrize("env_id,task,max_to_go", [("grpo_cls/MiniGrid-Empty-5x5-v0", 1, 99),
                                                  ("grpo_cls/MiniGrid-LavaGapS5-v0", 2, 99),
                                                  ("grpo_cls/MiniGrid-LavaGapS5-v0", 3, 99),
                                                  ("grpo_cls/MiniGrid-DoorKey-5x5-v0", 4, 5)])
def test_flawed_iff_the_shortest_plan_after_the_action_is_not_one_shorter(env_id, task, max_to_go):
    """At the states of a noisy walk (on DoorKey those at most `max_to_go` from the goal, where brute force
    is quick), for every action: the oracle calls it flawed iff brute force from the state it leads to finds
    no plan of steps_to_go - 1 actions. And info["flawed"] of the action taken is that verdict."""
    env = gym.make(env_id)
    base, rng = env.unwrapped, np.random.default_rng(task)
    env.reset(options={"task": task})
    checked, done = 0, False
    while not done:
        to_go = base.steps_to_go()
        if to_go <= max_to_go:
            for b in range(envs.N_ACTIONS):
                room = copy.deepcopy(base.room)
                room.step(b)
                one_shorter = brute_force_plan_length(room, limit=to_go - 1) == to_go - 1
                assert base.is_flawed(base.state(), b) == (not one_shorter), f"{base.action_names[b]}, {base.state()}"
                checked += 1
        a = noisy_action(env, rng, noise=0.4)
        flawed = base.is_flawed(base.state(), a)
        _, _, term, trunc, info = env.step(a)
        assert info["flawed"] == flawed
        done = term or trunc
    assert checked >= 3 * envs.N_ACTIONS


@needs_minigrid
@pytest.mark.parametrize("env_id", ROOMS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_the_optimal_policy_solves_every_room_in_the_fewest_steps_with_no_flawed_action(env_id, split):
    env = gym.make(env_id, split=split)
    for task in range(12):
        env.reset(options={"task": task})
        plan = env.unwrapped.steps_to_go()
        for t in range(env.unwrapped.max_steps):
            _, reward, term, trunc, info = env.step(env.unwrapped.optimal_action())
            assert not info["flawed"], f"task {task} step {t}"
            if term or trunc:
                break
        assert info["success"] and reward > 0 and t + 1 == plan, f"task {task}: {t + 1} steps, plan said {plan}"


@needs_minigrid
def test_the_heldout_split_is_the_same_task_in_a_larger_room():
    for env_id in ROOMS:
        train, heldout = (gym.make(env_id, split=s).unwrapped for s in ("train", "heldout"))
        assert heldout.room.width == train.room.width + 1
        assert train.missions() == heldout.missions() and train.vocab == heldout.vocab


# ---------------------------------------------------------------------------------------------
# What the policy reads
# ---------------------------------------------------------------------------------------------

@needs_minigrid
def test_the_vocabulary_is_declared_from_minigrids_constants():
    """Every (object, colour, state) MiniGrid can encode has its word before any episode is played."""
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
    vocab = set(gym.make(ROOMS[2]).unwrapped.vocab)
    assert {envs.cell_word(o, c, s) for o in OBJECT_TO_IDX for c in COLOR_TO_IDX for s in STATE_TO_IDX} <= vocab
    assert {"unseen", "empty", "grey-wall", "yellow-key", "yellow-door-locked", "green-goal", "red-lava"} <= vocab
    assert set(envs.HEADING_NAMES) <= vocab


@needs_minigrid
@pytest.mark.parametrize("env_id", ROOMS)
def test_observations_round_trip_through_the_tokenizer(env_id):
    """Each observation is the 49 cells, the heading and the mission, one known word each, and the
    tokenizer built from the training room encodes the held-out room's views too."""
    tok = g.Tokenizer(gym.make(env_id))
    for split in ("train", "heldout"):
        env = gym.make(env_id, split=split)
        for task in range(4):
            obs, _ = env.reset(options={"task": task})
            rng, done = np.random.default_rng(task), False
            while not done:
                words = obs.split()
                assert words[49] in envs.HEADING_NAMES and " ".join(words[50:]) == env.unwrapped.missions()[0]
                ids = tok.encode(obs)
                assert [tok.words[i] for i in ids[1: 1 + len(words)]] == words and not ids[1 + len(words):].any()
                obs, _, term, trunc, _ = env.step(noisy_action(env, rng, noise=0.5))
                done = term or trunc


@needs_minigrid
def test_the_view_shows_the_key_the_agent_holds_in_its_own_cell():
    env = gym.make("grpo_cls/MiniGrid-DoorKey-5x5-v0")
    env.reset(options={"task": 0})
    while env.unwrapped.state().holding is None:
        obs = env.step(env.unwrapped.optimal_action())[0]
    assert obs.split()[7 * 6 + 3] == "yellow-key"  # bottom row, middle: where the agent stands


# ---------------------------------------------------------------------------------------------
# Twin pairs
# ---------------------------------------------------------------------------------------------

@needs_minigrid
@pytest.mark.parametrize("env_id", ROOMS[1:])
def test_twin_pairs_are_a_few_words_apart_and_flip_the_oracle(env_id):
    """Each pair: two views 1 to 4 words apart, an action the oracle calls good at the first twin's true
    state and flawed at the second's (never a step into lava), and flawed_at_twin the oracle's verdicts
    at the second. The same seed gives the same pairs."""
    env = gym.make(env_id).unwrapped
    tok = g.Tokenizer(gym.make(env_id))
    pairs = env.twin_pairs(32, seed=0)
    assert len(pairs) == 32
    assert [p["note"] for p in pairs] == [p["note"] for p in env.twin_pairs(32, seed=0)]
    for p in pairs:
        apart = int((tok.encode(p["obs_good"]) != tok.encode(p["obs_flawed"])).sum())
        assert 1 <= apart <= 4 and apart == p["words_apart"], p["note"]
        env.reset(options={"task": p["task_good"]})
        assert not env.is_flawed(p["state_good"], p["action"]), p["note"]
        env.reset(options={"task": p["task_flawed"]})
        assert env.is_flawed(p["state_flawed"], p["action"]), p["note"]
        assert (env.flawed_actions(p["state_flawed"]) == p["flawed_at_twin"]).all()
        into = envs.room_step(env.fixed, p["state_flawed"], p["action"]).pos
        assert env.fixed.get(into) != "lava", p["note"]


@needs_minigrid
def test_pair_diagnostics_reads_the_twin_pairs():
    env_id = "grpo_cls/MiniGrid-DoorKey-5x5-v0"
    tok = g.Tokenizer(gym.make(env_id))
    pairs = gym.make(env_id).unwrapped.twin_pairs(8, seed=1)
    torch.manual_seed(0)
    policy = g.Policy(len(tok.words), tok.seq_len, tok.action_tokens, 16, 1, 2, with_classifier=False,
                      cls_design="shared")
    row = g.pair_diagnostics(policy, tok, pairs, torch.device("cpu"), with_grads=True)
    assert len(row["pair_flawed_probs"]) == len(row["pair_grad_cos"]) == 8
    assert all(0 < v < 1 for v in row["pair_good_probs"] + row["pair_flawed_probs"])


# ---------------------------------------------------------------------------------------------
# MiniGrid is optional
# ---------------------------------------------------------------------------------------------

def test_envs_py_imports_minigrid_only_inside_functions():
    tree = ast.parse(pathlib.Path(envs.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n and n.startswith("minigrid")]


def test_without_minigrid_envs_imports_and_a_minigrid_room_says_pip_install_minigrid():
    code = ("import sys; sys.modules['minigrid'] = None\n"  # what an environment without minigrid sees
            "import gymnasium as gym, envs\n"
            "try:\n    gym.make('grpo_cls/MiniGrid-LavaGapS5-v0')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=pathlib.Path(envs.__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("pip install minigrid") and len(out.stdout.strip().splitlines()) == 1

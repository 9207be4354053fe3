"""Small TextWorld games, played from exact tables: a real text game at table speed, without TextWorld.

An adapter for a world this project did not write. worlds/textworld_tables.py generates games with TextWorld's
`tw-make` from fixed seeds, plays every reachable state once and stores what the player is shown and where
every command leads, one JSON file per game in worlds/textworld/ (train-<seed>.json, heldout-<seed>.json).
This module reads those tables only: training, the tests and `make run` never need textworld installed.

envs.py registers it as grpo_cls/TextWorld-Small-v0 (`--env TextWorld-Small-v0`). The contract is Kitchen's:
  - task k is game k mod (games in the split), from its start. split="train": 16 games of two rooms;
    split="heldout": 8 games of three rooms, so every held-out layout is one the training family never shows.
  - the action space is every command of every game in both families, so the two share one policy. A game
    admits a few of them at a state (`info["action_mask"]`). Its table holds what every command of its own
    does at every state, and so does it for every other game's command that may act in it (one that names
    only things this game has, even in part: another game's "take key" takes this game's rectangular key).
    Any other command leaves the state as it is and reads nothing (the game's "You can't see any such
    thing." cleans to nothing); worlds/textworld_tables.live_check holds both to the engine.
  - `flawed`: not the first command of any shortest winning plan from the state, by breadth-first search
    over the table. `success`: the game is won. Reward 1 on winning, else 0; a lost state (none of these
    games has one) ends the episode too.
  - observation: "task : <the task> . <the reply> . <the room> . inventory : <what is carried>", each part
    cleaned by textworld_tables.clean (no banners, status lines or flavour text); the reply is left out
    where it repeats the room. At most `max_words` words.
  - `vocab` holds every word of both families, so a word only held-out games show (an object's name) has a
    token of its own whose embedding training never moves from its initial value.
  - `twin_pairs(n, seed)`: two observations of training games' reachable states, of the same length and one
    to four words apart, and a command both admit that is good at one and flawed at the other (at every
    state that reads so: an observation can be shown at several states).
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import UNREACHABLE, pick_task

TABLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "textworld")


def load_tables(folder: str, split: str) -> list[dict]:
    """The split's tables, in seed order."""
    paths = glob.glob(os.path.join(folder, f"{split}-*.json"))
    if not paths:
        raise ValueError(f"no TextWorld tables {split}-*.json in {folder} (make textworld-tables builds them)")
    tables = []
    for path in sorted(paths, key=lambda p: int(os.path.basename(p)[len(split) + 1:-len(".json")])):
        with open(path) as f:
            tables.append(json.load(f))
    return tables


def distances(table: dict) -> np.ndarray:
    """(S,) the length of a shortest winning plan from each state (UNREACHABLE where none), backwards from
    the won states over every move the table holds."""
    back = collections.defaultdict(set)
    for i, s in enumerate(table["states"]):
        for j in s["next"]:
            if j is not None:
                back[j].add(i)
    dist = np.full(len(table["states"]), UNREACHABLE)
    todo = collections.deque(i for i, s in enumerate(table["states"]) if s["won"])
    dist[list(todo)] = 0
    while todo:
        j = todo.popleft()
        for i in back[j]:
            if dist[i] == UNREACHABLE:
                dist[i] = dist[j] + 1
                todo.append(i)
    return dist


def observation(table: dict, state: int, reply: str) -> str:
    """What the agent reads at a state, after a reply."""
    s = table["states"][state]
    parts = [f"task : {table['task']}"] + ([reply] if reply and reply != s["room"] else []) + [s["room"]]
    return " . ".join(p for p in parts if p) + f" . inventory : {s['inventory']}"


@functools.lru_cache(maxsize=4)
def family(folder: str) -> dict:
    """Both splits' tables and what they share, read once per folder (a run makes hundreds of envs; none
    changes a table): the commands of every game, the vocabulary, the most words an observation has, the
    oracle's distances and each game's commands in the family's numbering."""
    tables = {k: load_tables(folder, k) for k in ("train", "heldout")}
    commands = sorted({c for k in tables for t in tables[k] for c in t["commands"]})
    texts = [observation(t, 0, "") for k in tables for t in tables[k]]
    texts += [observation(t, j, t["feedbacks"][f]) for k in tables for t in tables[k] for s in t["states"]
              for j, f in zip(s["next"], s["feedback"]) if j is not None]  # every state after every reply
    texts = set(texts)
    index = {c: i for i, c in enumerate(commands)}
    return {"tables": tables, "commands": commands,
            "vocab": sorted({w for x in texts for w in x.split()} | {w for c in commands for w in c.split()}),
            "max_words": max(len(x.split()) for x in texts),
            "charset": "".join(sorted({ch for x in texts for ch in x})),
            "dist": {k: [distances(t) for t in tables[k]] for k in tables},
            "local": {k: [{c: i for i, c in enumerate(t["commands"])} for t in tables[k]] for k in tables},
            "to_family": {k: [np.array([index[c] for c in t["commands"]]) for t in tables[k]] for k in tables}}


class TableTextWorld(gym.Env):
    """A family of small TextWorld games, played from their tables (see the module's docstring)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, split: str = "train", max_steps: int = 12, tables: str = TABLES,
                 render_mode: str | None = None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.split, self.max_steps, self.render_mode = split, max_steps, render_mode
        shared = family(os.path.abspath(tables))
        self.games, self.dist = shared["tables"][split], shared["dist"][split]
        self.action_names = self.commands = shared["commands"]
        self.action_space = spaces.Discrete(len(self.action_names))
        self.local = shared["local"][split]          # per game: family command -> the game's command index
        self.to_family = shared["to_family"][split]  # per game: the game's command index -> family action
        self.vocab, self.max_words = shared["vocab"], shared["max_words"]
        self.observation_space = spaces.Text(max_length=8 * self.max_words, charset=shared["charset"])

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = pick_task(self, options)
        self.game = self.task % len(self.games)
        self.table, self.state, self.t, self.reply = self.games[self.game], 0, 0, ""
        return self._obs(), self._info(flawed=False, success=False)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"TextWorld: action {action!r} is outside the action space {self.action_space} "
                             f"(commands 0..{len(self.action_names) - 1}; see env.action_names)")
        flawed = self.is_flawed(self.state, int(action))
        c = self.local[self.game].get(self.action_names[int(action)])
        s = self.table["states"][self.state]
        if c is not None and s["next"][c] is not None:
            self.state, self.reply = s["next"][c], self.table["feedbacks"][s["feedback"][c]]
        else:
            self.reply = ""                                  # a command this game has no use for
        self.t += 1
        success = bool(self.table["states"][self.state]["won"])
        terminated = success or bool(self.table["states"][self.state]["lost"])
        truncated = bool(not terminated and self.t >= self.max_steps)
        return self._obs(), float(success), terminated, truncated, self._info(flawed, success)

    def render(self):
        if self.render_mode == "ansi":
            return self._obs()
        return None

    # -- the oracle -------------------------------------------------------------------------------
    def steps_to_go(self, state: int | None = None) -> int:
        return int(self.dist[self.game][self.state if state is None else state])

    def next_state(self, state: int, action: int) -> int:
        c = self.local[self.game].get(self.action_names[action])
        j = None if c is None else self.table["states"][state]["next"][c]
        return state if j is None else j

    def is_flawed(self, state: int, action: int) -> bool:
        """Flawed = not the first command of some shortest winning plan from `state`."""
        return self.steps_to_go(self.next_state(state, action)) != self.steps_to_go(state) - 1

    def flawed_actions(self, state: int) -> np.ndarray:
        return np.array([self.is_flawed(state, a) for a in range(len(self.action_names))])

    def mask(self, state: int) -> np.ndarray:
        m = np.zeros(len(self.action_names), dtype=np.int8)
        m[self.to_family[self.game][self.table["states"][state]["admissible"]]] = 1
        return m

    def optimal_action(self) -> int:
        """The scripted optimal policy: the first admissible command that is not flawed."""
        legal = np.flatnonzero(self.mask(self.state))
        return int(next((a for a in legal if not self.is_flawed(self.state, a)), legal[0] if len(legal) else 0))

    # -- observations ----------------------------------------------------------------------------
    def _obs(self) -> str:
        return observation(self.table, self.state, self.reply)

    def _info(self, flawed: bool, success: bool) -> dict:
        return {"flawed": bool(flawed), "success": bool(success), "action_mask": self.mask(self.state)}

    def views(self) -> dict:
        """Every observation of the split's games at a state not yet won or lost, after every reply that can
        arrive there (the start's empty reply included): observation -> (task, state, surely good (A,),
        surely flawed (A,)), where "surely" means at every state that reads so (one observation can be shown
        at several states) and admitted there; task and state are the first such."""
        env, out = TableTextWorld(split=self.split, max_steps=self.max_steps), {}
        for task, table in enumerate(env.games):
            env.reset(options={"task": task})
            arrivals = collections.defaultdict(set, {0: {""}})
            for s in table["states"]:
                for j, f in zip(s["next"], s["feedback"]):
                    if j is not None:
                        arrivals[j].add(table["feedbacks"][f])
            for j in sorted(arrivals):
                if table["states"][j]["won"] or table["states"][j]["lost"]:
                    continue
                admitted, flawed = env.mask(j).astype(bool), env.flawed_actions(j)
                for reply in sorted(arrivals[j]):
                    obs = observation(table, j, reply)
                    first = out.get(obs, (task, j, admitted & ~flawed, admitted & flawed))
                    out[obs] = (*first[:2], first[2] & admitted & ~flawed, first[3] & admitted & flawed)
        return out

    def twin_pairs(self, n: int = 64, seed: int = 0, max_words_apart: int = 4) -> list[dict]:
        """n twin pairs drawn from the training games: two observations (views()) of the same length, 1 to
        `max_words_apart` words apart, and a command surely good at the first and surely flawed at the second.
        One pair of observations is kept per (good state, flawed state, command): the candidates are the
        distinct pairs of states. They come from every reachable state rather than from an agent's visits (16
        small games give a scripted agent few distinct views). Drawn with repeats only where fewer than n
        exist. Same keys as the other envs' pairs."""
        train = TableTextWorld(split="train", max_steps=self.max_steps)
        seen, rng = train.views(), np.random.default_rng(seed)
        views = list(seen)
        index = {w: i for i, w in enumerate(self.vocab)}
        by_length = collections.defaultdict(list)
        for i, v in enumerate(views):
            by_length[len(v.split())].append(i)
        found = {}  # (task, state good, task, state flawed, command) -> (view good, view flawed, words apart)
        for same in by_length.values():
            ids = np.array([[index[w] for w in views[i].split()] for i in same])     # (V_len, len) word ids
            good = np.stack([seen[views[i]][2] for i in same])                       # (V_len, A)
            bad = np.stack([seen[views[i]][3] for i in same])                        # (V_len, A)
            for a, i in enumerate(same):
                apart = (ids != ids[a]).sum(1)                                       # (V_len,) words apart
                near = np.flatnonzero((apart >= 1) & (apart <= max_words_apart))
                for b, c in zip(*np.nonzero(good[a] & bad[near])):
                    j = same[near[b]]
                    key = (*seen[views[i]][:2], *seen[views[j]][:2], int(c))
                    found.setdefault(key, (i, j, int(apart[near[b]])))
        if not found:
            raise ValueError("no twin pairs in the training games; allow more words apart")
        keys = sorted(found)
        pairs = []
        for k in rng.choice(len(keys), size=n, replace=len(keys) < n):
            (task_good, s_good, task_bad, s_bad, a), (i, j, apart) = keys[k], found[keys[k]]
            train.reset(options={"task": task_good})
            mask_good = train.mask(s_good)
            train.reset(options={"task": task_bad})
            mask_bad, flawed_bad = train.mask(s_bad), train.flawed_actions(s_bad)
            pairs.append({"obs_good": views[i], "obs_flawed": views[j], "action": a,
                          "mask_good": mask_good, "mask_flawed": mask_bad,
                          "flawed_at_twin": flawed_bad & (mask_bad == 1),
                          "task_good": task_good, "state_good": s_good, "task_flawed": task_bad,
                          "state_flawed": s_bad, "words_apart": apart, "visited": "reachable",
                          "note": f"'{self.action_names[a]}': {train.games[task_good]['game']} state {s_good} vs "
                                  f"{train.games[task_bad]['game']} state {s_bad} ({apart} words apart)"})
        return pairs

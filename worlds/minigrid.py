"""MiniGrid (Farama) rooms in words, with an oracle by breadth-first search over MiniGrid's true state.

An adapter for a world this project did not write: envs.py registers the rooms (grpo_cls/MiniGrid-*) with
this module's OracleMiniGrid as their entry point, so that neither this module nor MiniGrid is imported
until a room is made (`pip install minigrid==3.2.0`). OracleMiniGrid keeps envs.py's contract: a task per
index, two disjoint splits, `flawed`, `success` and `action_mask` in every info, a declared vocabulary, and
sampled twin pairs. A new adapter (a world we did not write) goes in a module of its own beside this one.
"""

from __future__ import annotations

import collections
import functools
import itertools
from typing import NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import UNREACHABLE, pick_task

N_ACTIONS = 7
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(N_ACTIONS)  # MiniGrid's Actions, in its order
HEADINGS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (dx, dy) for agent_dir 0..3, as MiniGrid's DIR_TO_VEC
HEADING_NAMES = ("east", "south", "west", "north")
FIXED_KINDS = ("wall", "floor", "goal", "lava")  # cells no action changes
THING_KINDS = ("door", "key", "ball")            # cells an action changes: doors open, keys and balls move


def import_minigrid():
    """MiniGrid, imported on first use, so that `import envs` never needs it."""
    try:
        import minigrid  # noqa: F401  (registers the MiniGrid-* ids with gymnasium)
    except ImportError:
        raise ImportError("the MiniGrid tasks need the minigrid package: pip install minigrid") from None
    return minigrid


class RoomState(NamedTuple):
    """What MiniGrid's step can change in a room: the agent, what it holds, the doors, keys and balls."""
    pos: tuple[int, int]
    heading: int                                        # agent_dir: 0 east, 1 south, 2 west, 3 north
    holding: tuple[str, str] | None                     # (kind, colour) of the object in hand
    things: tuple[tuple[int, int, str, str, str], ...]  # sorted (x, y, kind, colour, door state or "")


def read_room(room) -> tuple[frozenset, RoomState]:
    """The true state of a MiniGrid env (its env.unwrapped): the fixed cells as ((x, y), kind) pairs, and
    the RoomState. A room with an object the search does not model (a box) is refused."""
    fixed, things = set(), []
    for x in range(room.grid.width):
        for y in range(room.grid.height):
            obj = room.grid.get(x, y)
            if obj is None:
                continue
            if obj.type in FIXED_KINDS:
                fixed.add(((x, y), obj.type))
            elif obj.type in THING_KINDS:
                door = ""
                if obj.type == "door":
                    door = "open" if obj.is_open else "locked" if obj.is_locked else "closed"
                things.append((x, y, obj.type, obj.color, door))
            else:
                raise ValueError(f"the search models {', '.join(FIXED_KINDS + THING_KINDS)}, not a {obj.type}")
    holding = None if room.carrying is None else (room.carrying.type, room.carrying.color)
    pos = (int(room.agent_pos[0]), int(room.agent_pos[1]))
    return frozenset(fixed), RoomState(pos, int(room.agent_dir), holding, tuple(sorted(things)))


def room_step(fixed: dict, s: RoomState, action: int) -> RoomState:
    """MiniGrid's step as a pure function of the true state (the tests hold it to MiniGrid's own step).
    An action that changes nothing returns `s`: done, and the others where they do not apply."""
    front = (s.pos[0] + HEADINGS[s.heading][0], s.pos[1] + HEADINGS[s.heading][1])
    things = {(x, y): (kind, colour, door) for x, y, kind, colour, door in s.things}
    thing = things.get(front)

    def with_things(**change):
        return s._replace(things=tuple(sorted((x, y, *v) for (x, y), v in things.items())), **change)

    if action in (LEFT, RIGHT):
        return s._replace(heading=(s.heading + (1 if action == RIGHT else -1)) % 4)
    if action == FORWARD:  # walls, keys, balls and closed doors block; floor, goal, lava and open doors do not
        blocked = fixed.get(front) == "wall" or (thing is not None and thing[2] != "open")
        return s if blocked else s._replace(pos=front)
    if action == PICKUP and thing is not None and thing[0] != "door" and s.holding is None:
        del things[front]
        return with_things(holding=thing[:2])
    if action == DROP and s.holding is not None and thing is None and front not in fixed:
        things[front] = (*s.holding, "")
        return with_things(holding=None)
    if action == TOGGLE and thing is not None and thing[0] == "door":
        kind, colour, door = thing
        if door == "locked" and s.holding == ("key", colour):
            things[front] = (kind, colour, "open")
        elif door != "locked":
            things[front] = (kind, colour, "closed" if door == "open" else "open")
        return with_things()
    return s


@functools.lru_cache(maxsize=256)
def room_distances(fixed_cells: frozenset, start: RoomState) -> dict[RoomState, int]:
    """Steps to success from every state reachable from `start`: every reachable state and its successors
    first, then a breadth-first search backward from the states on the goal. A state missing from the
    dict cannot succeed (it is on lava, or no plan is left). Cached: a group replays one layout."""
    fixed = dict(fixed_cells)
    successors, todo = {}, [start]
    while todo:  # every reachable state; the goal and lava end the episode
        s = todo.pop()
        if s not in successors:
            ended = fixed.get(s.pos) in ("goal", "lava")
            successors[s] = [] if ended else [room_step(fixed, s, a) for a in range(N_ACTIONS)]
            todo += successors[s]
    predecessors = collections.defaultdict(set)
    for s, nexts in successors.items():
        for t in nexts:
            predecessors[t].add(s)
    dist = {s: 0 for s in successors if fixed.get(s.pos) == "goal"}
    frontier = list(dist)
    while frontier:  # backward, one step a round
        nxt = []
        for t in frontier:
            for s in predecessors[t] - dist.keys():
                dist[s] = dist[t] + 1
                nxt.append(s)
        frontier = nxt
    return dist


def cell_word(kind: str, colour: str, door: str) -> str:
    """One word for a cell of the view: 'unseen', 'empty', 'grey-wall', 'yellow-key', 'yellow-door-locked'."""
    if kind in ("unseen", "empty"):
        return kind
    return f"{colour}-{kind}-{door}" if kind == "door" else f"{colour}-{kind}"


class OracleMiniGrid(gym.Env):
    """A MiniGrid room in words, with the oracle and the contract of LavaGrid and Kitchen.

    It holds the MiniGrid env rather than being a gym.Wrapper: grpo_cls.py reads the contract (vocab,
    optimal_action, twin_pairs) from env.unwrapped, which for a wrapper is the env below it.
    Observation: the 7x7 view row by row, one word a cell (the agent at the bottom middle, facing up, its
    cell showing what it holds), the heading, then the mission. Task k is MiniGrid's seed k;
    split="heldout" plays `heldout_id`, the same task in a larger room.
    Actions: MiniGrid's seven, all legal, so `action_mask` is all ones (MiniGrid agents act unmasked, as an
    LLM agent does). The oracle special-cases none: `done` changes nothing in these rooms, `drop` and a
    `pickup` or `toggle` of nothing or of what the plan does not need only spend steps, so the search over
    all seven calls them flawed. Reward: MiniGrid's own, 1 - 0.9 t / max_steps on reaching the goal.
    """

    def __init__(self, minigrid_id: str, heldout_id: str | None = None, split: str = "train",
                 max_steps: int | None = None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if split == "heldout" and heldout_id is None:
            raise ValueError(f"{minigrid_id} has no held-out room: give heldout_id")
        import_minigrid()
        from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
        self.kwargs = {"minigrid_id": minigrid_id, "heldout_id": heldout_id, "max_steps": max_steps}
        self.split = split
        steps = {} if max_steps is None else {"max_steps": max_steps}
        self.room = gym.make(minigrid_id if split == "train" else heldout_id, **steps).unwrapped  # MiniGridEnv
        self.max_steps = self.room.max_steps
        self.names = [{i: name for name, i in table.items()} for table in (OBJECT_TO_IDX, COLOR_TO_IDX, STATE_TO_IDX)]
        self.action_space = spaces.Discrete(N_ACTIONS)
        self.action_names = [a.name for a in self.room.actions]  # left right forward pickup drop toggle done
        cells = {cell_word(k, c, s) for k in OBJECT_TO_IDX for c in COLOR_TO_IDX for s in STATE_TO_IDX}
        missions = self.missions()
        self.vocab = sorted(cells | set(HEADING_NAMES) | {w for m in missions for w in m.split()})
        self.max_words = self.room.agent_view_size ** 2 + 1 + max(len(m.split()) for m in missions)
        self.observation_space = spaces.Text(max_length=self.max_words * (1 + max(map(len, self.vocab))),
                                             charset="".join(sorted(set(" ".join(self.vocab)))))

    def missions(self) -> list[str]:
        """Every mission the room can give, read off its MissionSpace (placeholders filled in every way)."""
        space = self.room.observation_space["mission"]
        return [space.mission_func(*args) for args in itertools.product(*(space.ordered_placeholders or []))]

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = pick_task(self, options)
        obs, _ = self.room.reset(seed=self.task)
        self.fixed_cells, start = read_room(self.room)
        self.fixed = dict(self.fixed_cells)
        self.dist = room_distances(self.fixed_cells, start)
        return self.words(obs), self._info(flawed=False, success=False)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"MiniGrid: action {action!r} is outside the action space {self.action_space} "
                             f"({', '.join(f'{i}={a}' for i, a in enumerate(self.action_names))})")
        flawed = self.is_flawed(self.state(), int(action))
        obs, reward, terminated, truncated, _ = self.room.step(int(action))
        success = self.fixed.get(self.state().pos) == "goal"
        return self.words(obs), float(reward), terminated, truncated, self._info(flawed, success)

    # -- the oracle -------------------------------------------------------------------------------
    def state(self) -> RoomState:
        return read_room(self.room)[1]

    def steps_to_go(self, s: RoomState | None = None) -> int:
        """Length of a shortest successful plan from `s` (default: the true state now)."""
        return self.dist.get(self.state() if s is None else s, UNREACHABLE)

    def is_flawed(self, s: RoomState, action: int) -> bool:
        """Flawed = not the first action of some shortest successful plan from `s`."""
        return self.steps_to_go(room_step(self.fixed, s, action)) != self.steps_to_go(s) - 1

    def flawed_actions(self, s: RoomState) -> np.ndarray:
        """(A,) bool: the oracle's verdict on every action in `s`."""
        return np.array([self.is_flawed(s, a) for a in range(N_ACTIONS)])

    def optimal_action(self) -> int:
        """The scripted optimal policy: the first action that is not flawed."""
        s = self.state()
        return next((a for a in range(N_ACTIONS) if not self.is_flawed(s, a)), DONE)

    # -- observations ----------------------------------------------------------------------------
    def words(self, obs: dict) -> str:
        objects, colours, states = self.names
        view = obs["image"].transpose(1, 0, 2)  # (7, 7, 3) MiniGrid's [x, y] -> rows [y, x]
        cells = [cell_word(objects[o], colours[c], states[s]) for row in view for o, c, s in row]
        return " ".join(cells + [HEADING_NAMES[obs["direction"]], obs["mission"]])

    def _info(self, flawed: bool, success: bool) -> dict:
        return {"flawed": bool(flawed), "success": bool(success),
                "action_mask": np.ones(N_ACTIONS, dtype=np.int8)}  # every action is legal; some waste

    def twin_pairs(self, n: int = 64, seed: int = 0, noise: float = 0.3, max_words_apart: int = 4,
                   episodes: int = 0) -> list[dict]:
        """n twin pairs from the views a noisy scripted agent (chance `noise` of a random action) sees on
        `episodes` training tasks: two views 1 to `max_words_apart` words apart, in one layout or two, and an
        action the oracle calls good at the first and flawed at the second. Flawed steps into lava are left
        out, as in LavaGrid's pairs: the outcome reward punishes them directly. Each view keeps the first
        true state seen behind it. Where fewer than n pairs exist (Empty-5x5 has one layout, LavaGapS5 three)
        they are drawn with repeats. `episodes` defaults to 4 n. Same keys as LavaGrid's and Kitchen's pairs."""
        env, rng = OracleMiniGrid(**self.kwargs), np.random.default_rng(seed)
        seen = {}  # view -> (task, true state, flawed (A,), into lava (A,))
        for _ in range(episodes or 4 * n):
            obs, _ = env.reset(options={"task": int(rng.integers(2**31 - 1))})
            done = False
            while not done:
                s = env.state()
                lava = np.array([env.fixed.get(room_step(env.fixed, s, a).pos) == "lava" for a in range(N_ACTIONS)])
                seen.setdefault(obs, (env.task, s, env.flawed_actions(s), lava))
                a = int(rng.integers(N_ACTIONS)) if rng.random() < noise else env.optimal_action()
                obs, _, term, trunc, _ = env.step(a)
                done = term or trunc
        views = list(seen)
        index = {w: i for i, w in enumerate(self.vocab)}
        ids = np.array([[index[w] for w in v.split()] for v in views])             # (V, W) word ids
        flawed = np.stack([seen[v][2] for v in views])                            # (V, A)
        lava = np.stack([seen[v][3] for v in views])                              # (V, A)
        found = []
        for i in range(len(views)):
            apart = (ids != ids[i]).sum(1)                                         # (V,) words apart
            near = np.flatnonzero((apart >= 1) & (apart <= max_words_apart))
            flips = ~flawed[i] & flawed[near] & ~lava[near]                        # (len(near), A)
            found += [(i, int(near[j]), int(a), int(apart[near[j]])) for j, a in zip(*np.nonzero(flips))]
        if not found:
            raise ValueError(f"no twin pairs in {episodes or 4 * n} episodes; ask for more episodes or a larger "
                             f"max_words_apart")
        pairs = []
        for k in rng.choice(len(found), size=n, replace=len(found) < n):  # small rooms repeat their few pairs
            i, j, a, apart = found[k]
            (task_good, s_good, _, _), (task_bad, s_bad, flawed_bad, _) = seen[views[i]], seen[views[j]]
            pairs.append({"obs_good": views[i], "obs_flawed": views[j], "action": a,
                          "mask_good": np.ones(N_ACTIONS, np.int8), "mask_flawed": np.ones(N_ACTIONS, np.int8),
                          "flawed_at_twin": flawed_bad, "task_good": task_good, "state_good": s_good,
                          "task_flawed": task_bad, "state_flawed": s_bad, "words_apart": apart, "visited": "both",
                          "note": f"'{self.action_names[a]}': task {task_good} at {s_good.pos} facing "
                                  f"{HEADING_NAMES[s_good.heading]} vs task {task_bad} at {s_bad.pos} facing "
                                  f"{HEADING_NAMES[s_bad.heading]} ({apart} words apart)"})
        return pairs

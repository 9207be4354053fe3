"""Toy agent tasks where consecutive observations are nearly identical.

Importing this module registers, under the gymnasium namespace `grpo_cls`:

    grpo_cls/LavaGrid-v0   a 5x5 gridworld with an inner wall: reach the goal, avoid lava, do not waste steps
    grpo_cls/Kitchen-v0    a TextWorld/ALFWorld-style household task in words

and, made only when asked for (MiniGrid, `pip install minigrid`, is imported then), three MiniGrid rooms
in words with an oracle by search: grpo_cls/MiniGrid-Empty-5x5-v0, grpo_cls/MiniGrid-LavaGapS5-v0 and
grpo_cls/MiniGrid-DoorKey-5x5-v0. Their adapter is worlds/minigrid.py: an adapter for a world this project
did not write lives in worlds/, one module each, and is registered here by a string entry point. Also
grpo_cls/TextWorld-Small-v0: small TextWorld games (the engine under ALFWorld) played from exact tables stored
in the repo (worlds/textworld.py; textworld itself is needed only to build the tables).

All of them carry the same contract, which grpo_cls.py relies on:
  - `reset(seed=, options={"task": k})` picks task instance k (a layout, a goal) deterministically;
    without a task, the index is drawn from `self.np_random`. All dynamics noise is `self.np_random`.
  - `split="train"` or `split="heldout"` (constructor) selects one of two disjoint task families.
  - every `info` has `flawed` (the oracle's verdict on the action just taken), `success` and
    `action_mask` (int8, 1 = admissible).
  - `vocab` and `action_names` declare every token the observations and actions can contain, so a
    tokenizer never has to learn its vocabulary from data seen at run time.
  - `twin_probes()` returns pairs of observations that differ in at most two tokens, where one action
    is good in the first and flawed in the second: the states where gradient coupling shows (LavaGrid and
    Kitchen; the MiniGrid rooms have none, and their sampled pairs are up to four words apart). Each
    probe's `flawed_at_twin` (A,) marks every admissible action the oracle calls flawed at the second
    state: the other flawed actions there are the within-run control for coupling.
  - `twin_pairs(n, seed)` samples n such pairs, with the same keys, from states a noisy scripted agent
    visits on training tasks: many pairs over a range of overlaps, where twin_probes() has four.
  - Kitchen's `info["state_key"]` is what the agent sees with its own action history left out (the
    observation without its "history" part); `--cls-labels loop` compares situations by it. Envs
    without one (LavaGrid, whose observation has no history) are compared by the observation.
  - `steps_to_go(state)` is the exact length of a shortest successful plan from a state. The oracle
    is defined from it: an action is *flawed* iff it is not on some shortest plan (it is risky, or it
    does not bring the goal one step closer). The scripted optimal policy follows it.
"""

from __future__ import annotations

import dataclasses
import string

import gymnasium as gym
import numpy as np
from gymnasium import spaces

def pick_task(env: gym.Env, options: dict | None) -> int:
    """The task index from options={"task": k}, or else one drawn from the env's seeded np_random."""
    task = (options or {}).get("task")
    return int(env.np_random.integers(2**31 - 1)) if task is None else int(task)


# ---------------------------------------------------------------------------------------------
# LavaGrid: a gridworld with risky and wasteful moves
# ---------------------------------------------------------------------------------------------

GRID_TOKENS = ("empty", "wall", "lava", "goal", "agent")
EMPTY, WALL, LAVA, GOAL, AGENT = range(len(GRID_TOKENS))
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (drow, dcol) for up, right, down, left
MOVE_NAMES = ("up", "right", "down", "left")
UNREACHABLE = 10**6


def grid_is_heldout_goal(row: int, col: int) -> bool:
    """The held-out family: layouts whose goal sits on one of 5 of the 25 interior cells."""
    return (col + 2 * row) % 5 == 0


class LavaGridEnv(gym.Env):
    """Reach the goal in a walled 5x5 room with lava pools and a short inner wall.

    Stepping onto a cell beside lava is *risky*: with probability `slip_prob` the agent slips into
    the lava and the episode fails. Bumping a wall or moving away from the goal is *wasteful*: it
    burns the step budget. Both are flawed; a safe shortest path always exists.
    Observation: the 7x7 token grid (border walls included); one move changes two tokens.
    The inner wall (up to `n_wall` cells in a row, clipped at the room's edge, never on the goal or the
    start) makes the twin probes: beside it, the move that is good one cell over bumps into it.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, split: str = "train", size: int = 5, n_lava: int = 3, n_wall: int = 2,
                 slip_prob: float = 0.25, max_steps: int = 16, render_mode: str | None = None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.split, self.size, self.n_lava, self.n_wall = split, size, n_lava, n_wall
        self.slip_prob, self.max_steps, self.render_mode = slip_prob, max_steps, render_mode
        side = size + 2
        self.observation_space = spaces.MultiDiscrete(np.full((side, side), len(GRID_TOKENS)), dtype=np.int64)
        self.action_space = spaces.Discrete(len(MOVES))
        self.vocab = list(GRID_TOKENS)
        self.action_names = list(MOVE_NAMES)

    # -- task instances -------------------------------------------------------------------------
    def make_layout(self, task: int) -> np.ndarray:
        """Task instance `task` of this split: a (side, side) token grid with the agent placed."""
        rng = np.random.default_rng([task, 0 if self.split == "train" else 1])
        side, n = self.size + 2, self.size
        while True:  # rejection sampling; a valid layout is found in a few tries
            grid = np.full((side, side), WALL, dtype=np.int64)
            grid[1:-1, 1:-1] = EMPTY
            cells = [(r, c) for r in range(1, n + 1) for c in range(1, n + 1)]
            goal = cells[rng.integers(len(cells))]
            if grid_is_heldout_goal(*goal) != (self.split == "heldout"):
                continue
            start = cells[rng.integers(len(cells))]
            if abs(start[0] - goal[0]) + abs(start[1] - goal[1]) < 4:
                continue
            grid[goal] = GOAL
            # an interior wall segment of n_wall cells, horizontal or vertical, off the goal and the start
            r0, c0, down = rng.integers(1, n + 1), rng.integers(1, n + 1), rng.integers(2)
            for k in range(self.n_wall):
                r, c = (r0 + k, c0) if down else (r0, c0 + k)
                if r <= n and c <= n and (r, c) != goal and (r, c) != start:
                    grid[r, c] = WALL
            for i in rng.permutation(len(cells))[: self.n_lava]:
                r, c = cells[i]
                if (grid[r, c] == EMPTY and abs(r - goal[0]) + abs(c - goal[1]) > 1
                        and abs(r - start[0]) + abs(c - start[1]) > 1):
                    grid[r, c] = LAVA
            dist = self._safe_distances(grid)
            if 4 <= dist[start] <= 10:
                grid[start] = AGENT
                return grid

    @staticmethod
    def _safe_distances(grid: np.ndarray) -> np.ndarray:
        """Shortest-path length to the goal through safe cells. A passable cell beside lava gets 1 + its best
        safe neighbour (step out of danger, then the safe path), or UNREACHABLE if it has none."""
        side = grid.shape[0]
        lava = grid == LAVA
        near_lava = np.zeros_like(lava)
        for dr, dc in MOVES:
            near_lava |= np.roll(lava, (dr, dc), axis=(0, 1))
        passable = (grid != WALL) & ~lava
        safe = passable & ~near_lava
        dist = np.full(grid.shape, UNREACHABLE, dtype=np.int64)
        goal = tuple(np.argwhere(grid == GOAL)[0])
        dist[goal], frontier = 0, [goal]
        while frontier:  # breadth-first search outward from the goal, over safe cells only
            nxt = []
            for r, c in frontier:
                for dr, dc in MOVES:
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < side and 0 <= cc < side and safe[rr, cc] and dist[rr, cc] == UNREACHABLE:
                        dist[rr, cc] = dist[r, c] + 1
                        nxt.append((rr, cc))
            frontier = nxt
        safe_dist = dist.copy()  # read only safe cells' distances, so the scan order cannot matter
        for r, c in np.argwhere(passable & near_lava):  # one step out of danger, then the safe path
            best = min(safe_dist[r + dr, c + dc] for dr, dc in MOVES)
            dist[r, c] = min(UNREACHABLE, best + 1)
        return dist

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = pick_task(self, options)
        self.grid = self.make_layout(self.task)
        self.agent = tuple(int(x) for x in np.argwhere(self.grid == AGENT)[0])
        self.grid[self.agent] = EMPTY  # the grid holds the room; the agent is drawn in by _obs
        self.dist = self._safe_distances(self.grid)
        self.t, self.last = 0, None
        return self._obs(), self._info(flawed=False, success=False)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"LavaGrid: action {action!r} is outside the action space {self.action_space} "
                             f"(0=up, 1=right, 2=down, 3=left)")
        flawed = self.is_flawed(self.agent, int(action))
        dr, dc = MOVES[int(action)]
        nxt = (self.agent[0] + dr, self.agent[1] + dc)
        if self.grid[nxt] != WALL:
            self.agent = nxt
        self.t += 1
        fell = self.grid[self.agent] == LAVA
        if not fell and self.dist[self.agent] > 0 and self._near_lava(self.agent):
            fell = bool(self.np_random.random() < self.slip_prob)  # the slip that makes a step risky
        success = bool(self.grid[self.agent] == GOAL)
        self.last = f"{MOVE_NAMES[int(action)]} -> " + ("slipped into lava" if fell else "goal" if success else "ok")
        terminated = bool(fell or success)
        truncated = bool(not terminated and self.t >= self.max_steps)
        return self._obs(), float(success), terminated, truncated, self._info(flawed, success)

    def render(self):
        if self.render_mode != "ansi":
            return None
        chars = {EMPTY: ".", WALL: "#", LAVA: "~", GOAL: "G", AGENT: "A"}
        rows = ["".join(chars[int(v)] for v in row) for row in self._obs()]
        return "\n".join(rows) + f"\nstep {self.t}/{self.max_steps}" + (f"  last: {self.last}" if self.last else "")

    # -- the oracle -------------------------------------------------------------------------------
    def _near_lava(self, cell) -> bool:
        return any(self.grid[cell[0] + dr, cell[1] + dc] == LAVA for dr, dc in MOVES)

    def steps_to_go(self, cell=None) -> int:
        """Length of a shortest safe plan from `cell` (default: the agent's cell)."""
        return int(self.dist[cell or self.agent])

    def is_flawed(self, cell, action: int) -> bool:
        """Flawed = risky (lands beside or in lava) or wasteful (not one step closer on a safe path)."""
        dr, dc = MOVES[action]
        nxt = (cell[0] + dr, cell[1] + dc)
        if self.grid[nxt] == WALL:
            nxt = cell
        if self.grid[nxt] == GOAL:
            return False
        risky = self.grid[nxt] == LAVA or self._near_lava(nxt)
        return bool(risky or self.dist[nxt] != self.dist[cell] - 1)

    def is_risky(self, cell, action: int) -> bool:
        """The move lands in lava or beside it (a wall bump stays put, and is judged where it stays)."""
        dr, dc = MOVES[action]
        nxt = (cell[0] + dr, cell[1] + dc)
        nxt = cell if self.grid[nxt] == WALL else nxt
        return bool(self.grid[nxt] == LAVA or (self.grid[nxt] != GOAL and self._near_lava(nxt)))

    def optimal_action(self) -> int:
        """The scripted optimal policy: the first move that is not flawed."""
        return next((a for a in range(len(MOVES)) if not self.is_flawed(self.agent, a)), 0)

    # -- observations ----------------------------------------------------------------------------
    def _obs(self) -> np.ndarray:
        obs = self.grid.copy()  # (side, side) int64
        obs[self.agent] = AGENT
        return obs

    def _info(self, flawed: bool, success: bool) -> dict:
        return {"flawed": bool(flawed), "success": bool(success),
                "action_mask": np.ones(len(MOVES), dtype=np.int8)}  # every move is legal; some waste

    def twin_probes(self, n: int = 4) -> list[dict]:
        """Agent on two neighbouring cells of one layout (2 tokens differ); the same move is good on
        the first and, on the second, runs into the inner wall (wasteful: the agent stays put).
        The gridworld form of an inadmissible command ("nothing happens"). Lava-edge twins are not
        used: a risky move is what the outcome reward punishes directly (Lemma 3.1), so at those
        probes the direct push down competes with the coupling; see the README."""
        if self.n_wall < 1:
            raise ValueError("twin_probes() needs an inner wall (n_wall >= 1): its probes are bumps into it")
        probe_env = LavaGridEnv(split="train", size=self.size, n_lava=self.n_lava, n_wall=self.n_wall)
        probes, task = [], 0
        while len(probes) < n:  # one probe per layout, from layouts 0, 1, 2, ... until we have n
            probe_env.reset(options={"task": task})
            probe = self._first_twin(probe_env, task)
            if probe is not None:
                probes.append(probe)
            task += 1
        return probes

    @staticmethod
    def _first_twin(env: "LavaGridEnv", task: int) -> dict | None:
        grid, dist = env.grid, env.dist
        for r, c in np.argwhere((dist > 0) & (dist < UNREACHABLE) & (grid == EMPTY)):
            for a, (dr, dc) in enumerate(MOVES):
                twin = (int(r + dc), int(c + dr))  # the neighbour across the move's axis
                if grid[twin] != EMPTY or not 0 < dist[twin] < UNREACHABLE:
                    continue
                bump = (twin[0] + dr, twin[1] + dc)  # the flawed twin's move runs into the interior wall
                inner_wall = grid[bump] == WALL and 0 < bump[0] <= env.size and 0 < bump[1] <= env.size
                if env.is_flawed((r, c), a) or not inner_wall:
                    continue
                good, bad = grid.copy(), grid.copy()
                good[r, c], bad[twin] = AGENT, AGENT
                return {"obs_good": good, "obs_flawed": bad, "action": a,
                        "mask_good": np.ones(4, np.int8), "mask_flawed": np.ones(4, np.int8),
                        "flawed_at_twin": np.array([env.is_flawed(twin, b) for b in range(len(MOVES))]),
                        "task": task, "cell_good": (int(r), int(c)), "cell_flawed": twin,
                        "note": f"layout {task}: '{MOVE_NAMES[a]}' at {(int(r), int(c))} vs {twin}"}
        return None

    def twin_pairs(self, n: int = 64, seed: int = 0, noise: float = 0.3) -> list[dict]:
        """n twin pairs sampled from training layouts, one a layout: two cells that a noisy scripted agent
        (chance `noise` of a random move) visits in one episode, and a move good at the first and wasteful
        at the second (a wall bump or a detour). Any two cells of a layout are 2 tokens apart (where the
        agent is, and is not), so the pairs run from neighbours to the far side of the room: a range of
        overlaps. Lava-edge twins, where the move is risky at the flawed twin, are left out as in
        twin_probes: the outcome reward punishes a risky move directly. Same keys as twin_probes()."""
        env, rng, pairs = LavaGridEnv("train", self.size, self.n_lava, self.n_wall, self.slip_prob), \
            np.random.default_rng(seed), []
        while len(pairs) < n:
            task = int(rng.integers(2**31 - 1))
            env.reset(seed=int(rng.integers(2**31 - 1)), options={"task": task})
            cells, done = [env.agent], False
            while not done:
                a = int(rng.integers(len(MOVES))) if rng.random() < noise else env.optimal_action()
                _, _, term, trunc, _ = env.step(a)
                done = term or trunc
                if not done and env.agent not in cells:
                    cells.append(env.agent)
            found = [(c1, c2, a) for c1 in cells for c2 in cells for a in range(len(MOVES)) if c1 != c2
                     and not env.is_flawed(c1, a) and env.is_flawed(c2, a) and not env.is_risky(c2, a)]
            if not found:
                continue
            c1, c2, a = found[rng.integers(len(found))]
            good, bad = env.grid.copy(), env.grid.copy()
            good[c1], bad[c2] = AGENT, AGENT
            pairs.append({"obs_good": good, "obs_flawed": bad, "action": a, "mask_good": np.ones(4, np.int8),
                          "mask_flawed": np.ones(4, np.int8),
                          "flawed_at_twin": np.array([env.is_flawed(c2, b) for b in range(len(MOVES))]),
                          "task": task, "cell_good": c1, "cell_flawed": c2,
                          "note": f"layout {task}: '{MOVE_NAMES[a]}' at {c1} vs {c2}"})
        return pairs


# ---------------------------------------------------------------------------------------------
# Kitchen: a TextWorld/ALFWorld-style household task
# ---------------------------------------------------------------------------------------------

SURFACES = ("countertop", "diningtable", "shelf", "sinkbasin")
CONTAINERS = ("cabinet", "drawer", "fridge")  # closed at the start; must be opened
RECEPTACLES = SURFACES + CONTAINERS
OBJECTS = ("mug", "apple", "plate", "bowl", "cup", "egg")
SINK = "sinkbasin"
GOAL_RECEPTACLES = tuple(r for r in RECEPTACLES if r != SINK)


def kitchen_commands() -> list[str]:
    """The fixed action set: every instantiation of every command template (33 commands).
    `take`, `put` and `clean` act where the agent stands, so they name only the object."""
    return ([f"go to {r}" for r in RECEPTACLES] + [f"open {r}" for r in CONTAINERS]
            + [f"close {r}" for r in CONTAINERS] + [f"take {o}" for o in OBJECTS]
            + [f"put {o}" for o in OBJECTS] + [f"clean {o}" for o in OBJECTS] + ["look", "inventory"])


# command -> (verb, argument): "go to drawer" -> ("go", "drawer"); parsed once, read at every step
COMMAND_PARTS = {c: (c.split()[0], c.split()[-1]) for c in kitchen_commands()}


def kitchen_is_heldout(obj: str, goal: str, clean: bool) -> bool:
    """The held-out family: a quarter of the (object, goal receptacle, clean?) combinations."""
    return (OBJECTS.index(obj) + GOAL_RECEPTACLES.index(goal) + int(clean)) % 4 == 0


@dataclasses.dataclass
class KitchenState:
    loc: str | None            # None = the middle of the room, where every episode starts
    holding: str | None
    where: dict[str, str]      # object -> receptacle, for objects not in hand
    clean: frozenset[str]
    opened: frozenset[str]


class KitchenEnv(gym.Env):
    """"Put a (clean) mug in the cabinet." Text observations, 33 discrete commands.

    The observation repeats the task and the scene every step and adds the last two commands with
    their feedback, so consecutive observations share almost every word, as agent prompts do.
    Flawed commands (not on any shortest plan): repeats like `look`, back-and-forth moves, opening
    or closing containers the task does not need, taking or cleaning irrelevant objects, and any
    inadmissible command ("nothing happens", e.g. taking from a closed drawer).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    HISTORY = 2

    def __init__(self, split: str = "train", max_steps: int = 12, render_mode: str | None = None,
                 withhold: int = 0):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if withhold < 0:
            raise ValueError(f"withhold must be 0 (none) or a seed > 0, got {withhold}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.split, self.max_steps, self.render_mode = split, max_steps, render_mode
        self.withheld = self.withheld_goals(withhold) if split == "train" else frozenset()
        self.commands = kitchen_commands()
        self.action_names = list(self.commands)
        self.action_space = spaces.Discrete(len(self.commands))
        words = ("task : put a clean in . you are at the middle of room is open closed see nothing "
                 "hold dirty hand history -> done happens ;").split()
        self.vocab = sorted(set(words + list(RECEPTACLES) + list(OBJECTS)
                                + " ".join(self.commands).split()))
        self.max_words = 50  # an upper bound on the words of any observation (49; checked in the tests)
        self.observation_space = spaces.Text(max_length=400, charset=string.ascii_lowercase + " :.;->")

    # -- task instances -------------------------------------------------------------------------
    def make_task(self, task: int) -> tuple[tuple[str, str, bool], KitchenState]:
        """Task instance `task` of this split: ((object, goal receptacle, clean?), start state)."""
        rng = np.random.default_rng([task, 2 if self.split == "train" else 3])
        while True:
            obj = OBJECTS[rng.integers(len(OBJECTS))]
            goal = GOAL_RECEPTACLES[rng.integers(len(GOAL_RECEPTACLES))]
            clean = bool(rng.integers(2))
            if (kitchen_is_heldout(obj, goal, clean) == (self.split == "heldout")
                    and (obj, goal, clean) not in self.withheld):
                break
        others = [o for o in OBJECTS if o != obj]
        distractors = [others[i] for i in rng.permutation(len(others))[: 1 + rng.integers(2)]]
        sources = [r for r in RECEPTACLES if r != goal]
        where = {obj: sources[rng.integers(len(sources))]}
        for o in distractors:
            where[o] = RECEPTACLES[rng.integers(len(RECEPTACLES))]
        return (obj, goal, clean), KitchenState(None, None, where, frozenset(), frozenset())

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = pick_task(self, options)
        self.goal, self.state = self.make_task(self.task)
        self.t, self.history = 0, []
        return self._obs(), self._info(flawed=False, success=False)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"Kitchen: action {action!r} is outside the action space {self.action_space} "
                             f"(commands 0..{len(self.commands) - 1}; see env.commands)")
        command = self.commands[int(action)]
        before = self.steps_to_go(self.state)
        self.state, feedback = self.transition(self.state, command)
        after = self.steps_to_go(self.state)
        flawed = after != before - 1
        self.t += 1
        self.history = (self.history + [(command, feedback)])[-self.HISTORY:]
        success = after == 0
        truncated = bool(not success and self.t >= self.max_steps)
        return self._obs(), float(success), success, truncated, self._info(flawed, success)

    def render(self):
        if self.render_mode != "ansi":
            return None
        return self._obs().replace(" . ", " .\n") + f"\nstep {self.t}/{self.max_steps}"

    # -- dynamics: a pure function of (state, command) ------------------------------------------
    @staticmethod
    def admissible(s: KitchenState, command: str) -> bool:
        verb, arg = COMMAND_PARTS[command]
        here_open = s.loc in SURFACES or s.loc in s.opened  # None (the middle of the room) is in neither
        if verb == "go":
            return arg != s.loc
        if verb == "open":
            return s.loc == arg and arg not in s.opened
        if verb == "close":
            return s.loc == arg and arg in s.opened
        if verb == "take":
            return s.holding is None and here_open and s.where.get(arg) == s.loc
        if verb == "put":
            return s.holding == arg and here_open
        if verb == "clean":
            return s.holding == arg and s.loc == SINK
        return True  # look, inventory

    @classmethod
    def transition(cls, s: KitchenState, command: str) -> tuple[KitchenState, str]:
        """The next state and the feedback word for `command` in state `s`. `s` is not modified."""
        if not cls.admissible(s, command):
            return s, "nothing happens"
        verb, arg = COMMAND_PARTS[command]
        if verb == "go":
            return dataclasses.replace(s, loc=arg), "done"
        if verb == "open":
            return dataclasses.replace(s, opened=s.opened | {arg}), "done"
        if verb == "close":
            return dataclasses.replace(s, opened=s.opened - {arg}), "done"
        if verb == "take":
            where = {o: r for o, r in s.where.items() if o != arg}
            return dataclasses.replace(s, holding=arg, where=where), "done"
        if verb == "put":
            return dataclasses.replace(s, holding=None, where={**s.where, arg: s.loc}), "done"
        if verb == "clean":
            return dataclasses.replace(s, clean=s.clean | {arg}), "done"
        return s, "done"  # look, inventory: the observation already shows everything

    # -- the oracle -------------------------------------------------------------------------------
    def steps_to_go(self, s: KitchenState) -> int:
        """Exact length of a shortest plan from `s` (a closed form; the tests check it against
        breadth-first search over `transition`)."""
        obj, goal, need_clean = self.goal
        cleaned = obj in s.clean or not need_clean
        if s.where.get(obj) == goal and cleaned:
            return 0

        def closed(r):  # one `open` needed before acting on r
            return int(r in CONTAINERS and r not in s.opened)

        def deliver(loc, goal_closed):  # holding obj at loc: (clean it,) carry it to the goal, put
            if not cleaned:
                return int(loc != SINK) + 1 + 1 + goal_closed + 1
            return int(loc != goal) + goal_closed + 1

        if s.holding == obj:
            return deliver(s.loc, closed(goal))
        src = s.where[obj]
        fetch = int(s.loc != src) + closed(src) + 1            # go there, open it, take obj
        if s.holding is not None:                               # hands full: put the other thing down
            fetch += 1                                          # at obj's receptacle, on the way
        return fetch + deliver(src, closed(goal) if src != goal else 0)

    def is_flawed(self, command: str) -> bool:
        return self.steps_to_go(self.transition(self.state, command)[0]) != self.steps_to_go(self.state) - 1

    def flawed_commands(self, goal, s: KitchenState) -> np.ndarray:
        """(A,) bool: the oracle's verdict on every command in state `s` under task `goal`."""
        self.goal = goal
        return np.array([self.steps_to_go(self.transition(s, c)[0]) != self.steps_to_go(s) - 1
                         for c in self.commands])

    def optimal_action(self) -> int:
        """The scripted optimal policy: the first command that is not flawed."""
        return next(i for i, c in enumerate(self.commands) if not self.is_flawed(c))

    # -- observations ----------------------------------------------------------------------------
    def describe(self, goal, s: KitchenState, history) -> str:
        obj, target, clean = goal
        task = f"put a {'clean ' if clean else ''}{obj} in {target}"
        where = "middle of room" if s.loc is None else s.loc
        state = f" . {s.loc} is {'open' if s.loc in s.opened else 'closed'}" if s.loc in CONTAINERS else ""
        visible = s.loc is not None and (s.loc in SURFACES or s.loc in s.opened)
        seen = [o for o in OBJECTS if visible and s.where.get(o) == s.loc]
        hold = "nothing" if s.holding is None else \
            f"{'clean' if s.holding in s.clean else 'dirty'} {s.holding}"
        hint = f"{obj} is in hand" if s.holding == obj else f"{obj} is in {s.where[obj]}"
        past = " ; ".join(f"{c} -> {f}" for c, f in history) or "nothing"
        return (f"task : {task} . you are at {where}{state} . you see {' '.join(seen) or 'nothing'} . "
                f"you hold {hold} . {hint} . history : {past} .")

    def _obs(self) -> str:
        return self.describe(self.goal, self.state, self.history)

    def _info(self, flawed: bool, success: bool) -> dict:
        mask = np.array([self.admissible(self.state, c) for c in self.commands], dtype=np.int8)
        return {"flawed": bool(flawed), "success": bool(success), "action_mask": mask,
                "admissible_commands": [c for c, m in zip(self.commands, mask) if m],
                "state_key": self.describe(self.goal, self.state, [])}  # what it sees, no history

    def twin_probes(self) -> list[dict]:
        """Pairs of states one word apart (the task or the hint) where a command flips from good to
        flawed: the 'one word changed in the prompt' case from the paper."""
        S = KitchenState
        mug_apple = {"mug": "countertop", "apple": "countertop"}
        cases = [  # (goal in good twin, goal in flawed twin, state good, state flawed, command, note)
            (("mug", "cabinet", False), ("apple", "cabinet", False),
             S("countertop", None, mug_apple, frozenset(), frozenset()),
             S("countertop", None, mug_apple, frozenset(), frozenset()), "take mug", "which object the task names"),
            (("mug", "cabinet", True), ("mug", "cabinet", True),
             S("countertop", "mug", {"apple": "shelf"}, frozenset(), frozenset()),
             S("countertop", "mug", {"apple": "shelf"}, frozenset({"mug"}), frozenset()),
             "go to sinkbasin", "dirty vs clean mug in hand"),
            (("cup", "drawer", False), ("cup", "fridge", False),
             S("shelf", "cup", {"egg": "shelf"}, frozenset(), frozenset()),
             S("shelf", "cup", {"egg": "shelf"}, frozenset(), frozenset()), "go to drawer", "which receptacle the task names"),
            (("plate", "shelf", False), ("plate", "shelf", False),
             S(None, None, {"plate": "drawer", "bowl": "fridge"}, frozenset(), frozenset()),
             S(None, None, {"plate": "fridge", "bowl": "drawer"}, frozenset(), frozenset()),
             "go to drawer", "where the hint says the object is"),
        ]
        history = [("look", "done")]
        oracle = KitchenEnv(split=self.split)  # judges commands under the flawed twin's goal
        probes = []
        for goal_good, goal_bad, s_good, s_bad, command, note in cases:
            masks = [np.array([self.admissible(s, c) for c in self.commands], np.int8) for s in (s_good, s_bad)]
            probes.append({"obs_good": self.describe(goal_good, s_good, history),
                           "obs_flawed": self.describe(goal_bad, s_bad, history),
                           "action": self.commands.index(command), "mask_good": masks[0], "mask_flawed": masks[1],
                           "flawed_at_twin": oracle.flawed_commands(goal_bad, s_bad) & masks[1].astype(bool),
                           "goal_good": goal_good, "state_good": s_good, "goal_flawed": goal_bad,
                           "state_flawed": s_bad, "note": f"'{command}': {note}"})
        return probes

    def twin_pairs(self, n: int = 64, seed: int = 0, noise: float = 0.3, episodes: int = 0) -> list[dict]:
        """n twin pairs sampled from the states a noisy scripted agent (chance `noise` of a random
        admissible command) visits on `episodes` training tasks. A pair is a visited state under its own
        goal and the same state under another training goal one or two words away (another goal
        receptacle, or another object lying where the task's object lies), with a command the oracle
        calls good under one goal and flawed under the other. `visited` says which side the agent saw:
        the other is a goal of the training family in a state its agent may or may not reach. At most
        one pair per visited state; `episodes` defaults to 5 n. Same keys as twin_probes()."""
        env, rng = KitchenEnv(split="train", max_steps=self.max_steps), np.random.default_rng(seed)
        visited, episodes = [], episodes or 5 * n
        for _ in range(episodes):
            env.reset(options={"task": int(rng.integers(2**31 - 1))})
            done = False
            while not done:
                visited.append((env.goal, env.state, list(env.history)))
                legal = [i for i, c in enumerate(self.commands) if self.admissible(env.state, c)]
                a = int(rng.choice(legal)) if rng.random() < noise else env.optimal_action()
                _, _, term, trunc, _ = env.step(a)
                done = term or trunc
        pairs = []
        for i in rng.permutation(len(visited)):
            goal, s, history = visited[i]
            words = self.describe(goal, s, history).split()
            for twin in self.goal_twins(goal, s):
                other = self.describe(twin, s, history).split()
                if len(other) != len(words) or sum(x != y for x, y in zip(words, other)) > 2:
                    continue
                mask = np.array([self.admissible(s, c) for c in self.commands])
                flawed = {g: env.flawed_commands(g, s) & mask for g in (goal, twin)}
                flips = np.flatnonzero(mask & (flawed[goal] != flawed[twin]))
                if not len(flips):
                    continue
                a = int(rng.choice(flips))
                good, bad = (twin, goal) if flawed[goal][a] else (goal, twin)
                pairs.append({"obs_good": self.describe(good, s, history),
                              "obs_flawed": self.describe(bad, s, history), "action": a,
                              "mask_good": mask.astype(np.int8), "mask_flawed": mask.astype(np.int8),
                              "flawed_at_twin": flawed[bad], "goal_good": good, "state_good": s,
                              "goal_flawed": bad, "state_flawed": s,
                              "visited": "good" if good == goal else "flawed",
                              "note": f"'{self.commands[a]}': {good} vs {bad}"})
                break
            if len(pairs) == n:
                return pairs
        raise ValueError(f"only {len(pairs)} twin pairs in {episodes} episodes; ask for more episodes")

    @staticmethod
    def withheld_goals(seed: int) -> frozenset:
        """withhold=seed leaves out of the training split a random half (27 of 55) of its goals, drawn by
        `seed`: the intervention of results/PROTOCOL.md. twin_pairs() still samples from every training
        goal, so a pair's good twin may be a goal this env never trains on. 0 withholds none."""
        if seed == 0:
            return frozenset()
        goals = [(o, r, c) for o in OBJECTS for r in GOAL_RECEPTACLES for c in (False, True)
                 if not kitchen_is_heldout(o, r, c)]                                     # 55 goals
        order = np.random.default_rng([seed, 4]).permutation(len(goals))
        return frozenset(goals[i] for i in order[: len(goals) // 2])

    @staticmethod
    def goal_twins(goal, s: KitchenState) -> list[tuple[str, str, bool]]:
        """The training goals one change from `goal` that state `s` can hold: another goal receptacle,
        or another object (one not in hand) at the same receptacle as the task's object."""
        obj, target, clean = goal
        others = [(obj, r, clean) for r in GOAL_RECEPTACLES if r != target]
        others += [(o, target, clean) for o in OBJECTS if o != obj and o in s.where
                   and s.where[o] == s.where.get(obj)]
        return [g for g in others if not kitchen_is_heldout(*g)]


# ---------------------------------------------------------------------------------------------
# Worlds we did not write: MiniGrid's rooms, in words with an oracle (worlds/minigrid.py)
# ---------------------------------------------------------------------------------------------

# in-domain room -> held-out room: the same task one cell larger, layouts a policy never trains on
MINIGRID_ROOMS = {"MiniGrid-Empty-5x5-v0": "MiniGrid-Empty-6x6-v0",
                  "MiniGrid-LavaGapS5-v0": "MiniGrid-LavaGapS6-v0",
                  "MiniGrid-DoorKey-5x5-v0": "MiniGrid-DoorKey-6x6-v0"}

# A TextWorld family (Microsoft's engine under ALFWorld), played from exact tables stored in worlds/textworld/:
# worlds/textworld.py reads them, and textworld itself is needed only to build them (worlds/textworld_tables.py)
TEXTWORLD_GAMES = {"TextWorld-Small-v0": "worlds.textworld:TableTextWorld"}

# ---------------------------------------------------------------------------------------------
# Registration (idempotent, so re-importing does not warn)
# ---------------------------------------------------------------------------------------------

for _id, _cls in (("grpo_cls/LavaGrid-v0", LavaGridEnv), ("grpo_cls/Kitchen-v0", KitchenEnv)):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls)


def register_minigrid(name: str, heldout: str | None = None) -> str:
    """Register grpo_cls/<name>, the MiniGrid env `name` with an oracle (worlds.minigrid.OracleMiniGrid); its
    held-out family is the env `heldout`, or none. Returns the id. The adapter and MiniGrid are imported only
    when the env is made: the entry point is a string."""
    env_id = f"grpo_cls/{name}"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point="worlds.minigrid:OracleMiniGrid",
                     kwargs={"minigrid_id": name, "heldout_id": heldout})
    return env_id


for _name, _heldout in MINIGRID_ROOMS.items():
    register_minigrid(_name, _heldout)

for _name, _entry in TEXTWORLD_GAMES.items():
    if f"grpo_cls/{_name}" not in gym.registry:
        gym.register(id=f"grpo_cls/{_name}", entry_point=_entry)

"""The specification of grpo_cls.py and envs.py, as tests. Run: make test."""

import ast
import collections
import copy
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
import grpo_cls as g
from worlds import minigrid as minigrid_world
from worlds import textworld as textworld_world

HERE = os.path.dirname(os.path.abspath(__file__))
ENV_IDS = ["grpo_cls/LavaGrid-v0", "grpo_cls/Kitchen-v0"]
needs_minigrid = pytest.mark.skipif(importlib.util.find_spec("minigrid") is None, reason="pip install minigrid")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread_per_worker():
    """make test runs two single-thread workers on two cores; a test that took a second thread would
    slow both workers many times over."""
    yield
    assert torch.get_num_threads() == 1, "this test left torch with more than one thread"


# ---------------------------------------------------------------------------------------------
# The loss math, checked exactly
# ---------------------------------------------------------------------------------------------

def test_group_advantages_mean_only_is_reward_minus_group_mean():
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    A = g.group_advantages(R, "none")
    assert torch.allclose(A, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]))


def test_group_advantages_group_scaling_divides_by_unbiased_group_std():
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    std = torch.tensor([[math.sqrt(1 / 3)], [0.5]])  # sample std with n-1 = 3
    assert torch.allclose(g.group_advantages(R, "group"), (R - R.mean(1, keepdim=True)) / (std + 1e-4))


def test_group_advantages_batch_scaling_divides_by_one_batch_std():
    R = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / (R.std() + 1e-4)
    assert torch.allclose(g.group_advantages(R, "batch"), expected)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_tied_group_gets_exactly_zero_advantage(scale):
    R = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    A = g.group_advantages(R, scale)
    assert torch.equal(A[:2], torch.zeros(2, 3)) and A[2].abs().sum() > 0


def test_clipped_surrogate_values_and_gradient():
    eps = 0.2
    rho = torch.tensor([1.0, 1.5, 1.5, 0.5, 0.5, 1.1])
    A = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -2.0])
    logp_old = torch.zeros(6)
    logp = rho.log().requires_grad_(True)
    loss = g.clipped_surrogate(logp, logp_old, A, eps)
    # -min(rho A, clip(rho) A)
    assert torch.allclose(loss, torch.tensor([-1.0, -1.2, 1.5, -0.5, 0.8, 2.2]), atol=1e-6)
    loss.sum().backward()
    # d/dlogp of -rho*A is -rho*A where the unclipped term is the min; 0 where the clipped one is
    assert torch.allclose(logp.grad, torch.tensor([-1.0, 0.0, 1.5, -0.5, 0.0, 2.2]), atol=1e-6)


def test_kl_k3_is_zero_at_equality_nonnegative_and_unbiased_for_kl():
    logp = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0)
    logp_ref = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 0.2]), 0)
    assert torch.equal(g.kl_k3(logp, logp), torch.zeros(4))
    assert (g.kl_k3(logp, logp_ref) >= 0).all()
    # E_{a~pi}[k3] = KL(pi || pi_ref) exactly, because E_pi[pi_ref / pi] = 1
    expected_kl = (logp.exp() * (logp - logp_ref)).sum()
    assert torch.allclose((logp.exp() * g.kl_k3(logp, logp_ref)).sum(), expected_kl, atol=1e-6)


def test_classification_loss_ignores_unlabelled_samples_in_value_and_gradient():
    logit = torch.tensor([2.0, -1.0, 0.5, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    labelled = torch.tensor([True, True, False, False])
    loss = g.classification_loss(logit, y, labelled)
    manual = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))) / 2
    assert loss.item() == pytest.approx(manual, rel=1e-6)
    loss.backward()
    assert logit.grad[2] == 0 and logit.grad[3] == 0 and logit.grad[0] != 0
    none = g.classification_loss(logit, y, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0


def gradient_lists(seed: int, n_lists: int = 30):
    """Lists of 5 to 40 random gradients of 1 to 300 entries and varied scale: enough tensors that a
    vectorised reduction over their norms rounds differently when the list grows by one."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_lists):
        k = int(torch.randint(5, 41, (1,), generator=gen))
        yield [torch.randn(int(torch.randint(1, 301, (1,), generator=gen)), generator=gen)
               * 10 * float(torch.rand(1, generator=gen)) for _ in range(k)]


def test_total_norm_is_the_l2_norm_of_all_gradients_and_skips_none():
    grads = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    assert g.total_norm(grads).item() == 5.0 and g.total_norm(grads).dtype == torch.float64
    assert g.total_norm([None]).item() == 0.0


def test_clip_to_norm_ignores_zero_gradient_tensors_bit_for_bit_wherever_they_sit():
    """A classifier weighted 0 adds parameters whose gradient is all zeros. They must not move the clip by
    a bit: the clipped gradients, with zero tensors inserted at any position, equal those without. torch's
    clip_grad_norm_ fails this on x86-64 CPUs (AVX2 and AVX-512): its norm moves in the last bit."""
    for grads in gradient_lists(seed=0):
        clipped, norm = g.clip_to_norm(grads, max_norm=1.0)
        assert norm > 1.0  # the clip acts, so every clipped tensor depends on the norm
        for at in range(len(grads) + 1):
            padded = grads[:at] + [torch.zeros(7), None] + grads[at:]
            clipped_padded, norm_padded = g.clip_to_norm(padded, max_norm=1.0)
            assert torch.equal(norm, norm_padded)
            for c, cp in zip(clipped, clipped_padded[:at] + clipped_padded[at + 2:], strict=True):
                assert torch.equal(c, cp)


def test_clip_to_norm_scales_to_max_norm_above_it_and_leaves_gradients_alone_below():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    clipped, norm = g.clip_to_norm(grads, max_norm=1.0)
    assert norm.item() == 5.0 and g.total_norm(clipped).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.0])) and torch.allclose(clipped[1], torch.tensor([0.8]))
    unclipped, _ = g.clip_to_norm(grads, max_norm=10.0)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, grads))


def test_advantage_labels_call_negative_advantage_bad_and_leave_ties_unlabelled():
    A = torch.tensor([0.7, -0.3, 0.0])
    flawed = torch.tensor([True, False, True])
    batch = {"flawed": flawed.numpy()}
    y, labelled = g.classifier_labels(tiny(out="unused", cls_labels="advantage"), batch, A)
    assert y.tolist() == [0.0, 1.0, 0.0] and labelled.tolist() == [True, True, False]
    y, labelled = g.classifier_labels(tiny(out="unused", cls_labels="oracle"), batch, A)
    assert y.tolist() == [1.0, 0.0, 1.0] and labelled.all()


# ---------------------------------------------------------------------------------------------
# The environments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_env_passes_gymnasium_check_env(env_id, split):
    check_env(gym.make(env_id, split=split, render_mode="ansi").unwrapped)


def play(env, actions, seed=0, task=3):
    obs, info = env.reset(seed=seed, options={"task": task})
    trace = [str(obs)]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        trace.append((str(obs), r, term, trunc, info["flawed"]))
        if term or trunc:
            break
    return trace


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_and_task_give_the_same_episode(env_id):
    env = gym.make(env_id)
    actions = np.random.default_rng(0).integers(env.action_space.n, size=30)
    assert play(env, actions, seed=5) == play(env, actions, seed=5)
    layouts = {str(env.reset(seed=s)[0]) for s in range(20)}  # no task given: drawn from the seed
    assert len(layouts) > 10


def test_grid_slips_come_from_the_seed():
    env = gym.make("grpo_cls/LavaGrid-v0", slip_prob=0.5).unwrapped

    def steps_until_slip(seed):  # stand beside the lava at (2,3) of layout 0 and bump the wall above
        env.reset(seed=seed, options={"task": 0})
        env.agent = (1, 3)
        for t in range(1, 17):
            _, _, term, trunc, info = env.step(0)
            assert info["flawed"]  # a wall bump beside lava is both wasteful and risky
            if term or trunc:
                return t, term
    outcomes = [steps_until_slip(seed) for seed in range(30)]
    assert len(set(outcomes)) > 3                      # different seeds, different slips
    assert outcomes == [steps_until_slip(seed) for seed in range(30)]  # the same seed, the same slips
    falls = sum(term for _, term in outcomes)
    assert falls == 30                                  # at p = 0.5, 16 tries: all fall (1 - 2**-16 each)


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_scripted_optimal_policy_solves_every_task_with_zero_flawed_actions(env_id, split):
    env = gym.make(env_id, split=split)
    for task in range(150):
        env.reset(seed=task, options={"task": task})
        start = env.unwrapped.steps_to_go(env.unwrapped.state) if "Kitchen" in env_id else env.unwrapped.steps_to_go()
        for t in range(env.unwrapped.max_steps):
            _, _, term, trunc, info = env.step(env.unwrapped.optimal_action())
            assert not info["flawed"], f"task {task} step {t}"
            if term or trunc:
                break
        assert info["success"] and t + 1 == start, f"task {task}: {t + 1} steps, plan said {start}"


def test_train_and_heldout_families_are_disjoint():
    """No Kitchen goal (object, receptacle, clean) and no LavaGrid goal cell occurs in both splits."""
    seen = {}
    for split in ("train", "heldout"):
        grid, kitchen = gym.make("grpo_cls/LavaGrid-v0", split=split), gym.make("grpo_cls/Kitchen-v0", split=split)
        seen[split] = ({tuple(np.argwhere(grid.unwrapped.make_layout(t) == envs.GOAL)[0]) for t in range(2000)},
                       {kitchen.unwrapped.make_task(t)[0] for t in range(2000)})
    for train, heldout in zip(seen["train"], seen["heldout"]):
        assert len(train) >= 5 and len(heldout) >= 3 and not train & heldout


def kitchen_at(goal, state):
    env = gym.make("grpo_cls/Kitchen-v0").unwrapped
    env.reset(options={"task": 0})
    env.goal, env.state = goal, state
    return env


def test_kitchen_oracle_flags_each_kind_of_flawed_command():
    S = envs.KitchenState
    env = kitchen_at(("mug", "cabinet", True), S("countertop", None, {"mug": "countertop", "apple": "countertop"},
                                                  frozenset(), frozenset()))
    assert not env.is_flawed("take mug")
    assert env.is_flawed("take apple")          # an irrelevant object
    assert env.is_flawed("look")                # a repeat of what the observation already shows
    assert env.is_flawed("go to fridge")        # a detour
    assert env.is_flawed("open drawer")         # inadmissible here: nothing happens
    env = kitchen_at(("mug", "cabinet", False), S("cabinet", "mug", {}, frozenset(), frozenset()))
    assert env.is_flawed("put mug")             # acting on a closed container: nothing happens
    assert not env.is_flawed("open cabinet")
    env = kitchen_at(("mug", "cabinet", False), S("cabinet", "mug", {}, frozenset(), frozenset({"cabinet"})))
    assert env.is_flawed("close cabinet") and env.is_flawed("go to sinkbasin")  # undoing progress; needless cleaning


def test_kitchen_steps_to_go_equals_breadth_first_search_over_the_dynamics():
    env = gym.make("grpo_cls/Kitchen-v0").unwrapped
    key = lambda s: (s.loc, s.holding, tuple(sorted(s.where.items())), s.clean, s.opened)  # noqa: E731
    for task in (0, 3, 8, 11):  # tasks with one distractor: ~10^4 reachable states each
        env.reset(options={"task": task})
        # every state reachable from the start, then distances to success by backward BFS
        seen, frontier, edges = {key(env.state): env.state}, [env.state], collections.defaultdict(set)
        while frontier:
            nxt = []
            for s in frontier:
                for c in env.commands:
                    s2 = env.transition(s, c)[0]
                    k2 = key(s2)
                    edges[k2].add(key(s))
                    if k2 not in seen and env.steps_to_go(s) > 0:
                        seen[k2] = s2
                        nxt.append(s2)
            frontier = nxt
        dist = {k: 0 for k, s in seen.items() if env.steps_to_go(s) == 0}
        frontier = list(dist)
        while frontier:
            nxt = []
            for k in frontier:
                for k0 in edges[k]:
                    if k0 not in dist:
                        dist[k0] = dist[k] + 1
                        nxt.append(k0)
            frontier = nxt
        assert len(seen) > 500
        for k, s in seen.items():
            assert env.steps_to_go(s) == dist[k], f"task {task} state {s}"


def test_grid_oracle_flags_wall_bumps_lava_edges_and_detours():
    env = gym.make("grpo_cls/LavaGrid-v0").unwrapped
    env.reset(options={"task": 0})
    # layout 0: lava at (2,3), (5,1); goal at (3,2)
    assert env.grid[2, 3] == envs.LAVA and env.grid[3, 2] == envs.GOAL
    assert not env.is_flawed((3, 3), 3)   # left onto the goal
    assert env.is_flawed((3, 1), 3)       # left: a wall bump
    assert env.is_flawed((4, 3), 0)       # up to (3,3), which borders lava: risky though one step closer
    assert env.is_flawed((4, 2), 2)       # down: away from the goal
    env.reset(options={"task": 1})        # layout 1: an interior wall at (2,3), (3,3); goal at (2,2)
    assert env.grid[3, 3] == envs.WALL and env.grid[2, 2] == envs.GOAL
    assert not env.is_flawed((4, 4), 3)   # left, towards the goal
    assert env.is_flawed((3, 4), 3)       # left into the interior wall: a bump, the probe's flaw


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_twin_probes_differ_in_at_most_two_tokens_and_flip_the_oracle(env_id):
    env = gym.make(env_id).unwrapped
    env.reset(options={"task": 0})
    tok = g.Tokenizer(gym.make(env_id))
    probes = env.twin_probes()
    assert len(probes) >= 4
    for p in probes:
        diff = (tok.encode(p["obs_good"]) != tok.encode(p["obs_flawed"])).sum()
        assert 1 <= diff <= 2, p["note"]
        assert p["mask_good"][p["action"]] and p["mask_flawed"][p["action"]]
        if "Kitchen" in env_id:
            command = env.commands[p["action"]]
            assert not kitchen_at(p["goal_good"], p["state_good"]).is_flawed(command)
            assert kitchen_at(p["goal_flawed"], p["state_flawed"]).is_flawed(command)
        else:
            env.reset(options={"task": p["task"]})
            assert not env.is_flawed(p["cell_good"], p["action"]) and env.is_flawed(p["cell_flawed"], p["action"])
            dr, dc = envs.MOVES[p["action"]]
            r, c = p["cell_flawed"][0] + dr, p["cell_flawed"][1] + dc
            assert env.grid[r, c] == envs.WALL and 0 < r <= env.size and 0 < c <= env.size  # an interior wall


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sampled_twin_pairs_come_from_the_training_family_differ_in_one_or_two_tokens_and_flip_the_oracle(env_id):
    """twin_pairs(): the pairs a coupling measure averages over. Each is two observations of the training
    family one or two tokens apart, and an admissible action the oracle calls good in the first and
    wasteful or wrong in the second; the same seed gives the same pairs, another seed others."""
    env = gym.make(env_id).unwrapped
    tok = g.Tokenizer(gym.make(env_id))
    pairs = env.twin_pairs(64, seed=0)
    assert len(pairs) == 64 and len({(str(p["obs_good"]), str(p["obs_flawed"])) for p in pairs}) >= 60
    for p in pairs:
        diff = (tok.encode(p["obs_good"]) != tok.encode(p["obs_flawed"])).sum()
        assert 1 <= diff <= 2, p["note"]
        assert p["mask_good"][p["action"]] and p["mask_flawed"][p["action"]] and p["flawed_at_twin"][p["action"]]
        if "Kitchen" in env_id:
            command = env.commands[p["action"]]
            assert not envs.kitchen_is_heldout(*p["goal_good"]) and not envs.kitchen_is_heldout(*p["goal_flawed"])
            assert not kitchen_at(p["goal_good"], p["state_good"]).is_flawed(command)
            assert kitchen_at(p["goal_flawed"], p["state_flawed"]).is_flawed(command)
        else:
            env.reset(options={"task": p["task"]})
            assert not envs.grid_is_heldout_goal(*np.argwhere(env.grid == envs.GOAL)[0])
            assert not env.is_flawed(p["cell_good"], p["action"]) and env.is_flawed(p["cell_flawed"], p["action"])
            assert not env.is_risky(p["cell_flawed"], p["action"])  # lava-edge twins are left out
    if "Kitchen" in env_id:
        assert {p["visited"] for p in pairs} == {"good", "flawed"}
    else:  # any two cells of a layout are two tokens apart: pairs from neighbours to across the room
        apart = [abs(p["cell_good"][0] - p["cell_flawed"][0]) + abs(p["cell_good"][1] - p["cell_flawed"][1])
                 for p in pairs]
        assert min(apart) == 1 and max(apart) >= 4
    eight = [p["note"] for p in env.twin_pairs(8, seed=0)]
    assert [p["note"] for p in env.twin_pairs(8, seed=0)] == eight != [p["note"] for p in env.twin_pairs(8, seed=1)]


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("bad", [-1, 99, 1.5, "up"])
def test_out_of_space_action_raises_a_clear_error(env_id, bad):
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(bad)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_random_play_keeps_info_keys_and_observations_in_the_declared_vocabulary(env_id):
    env, rng = gym.make(env_id), np.random.default_rng(0)
    tok = g.Tokenizer(env)
    for episode in range(30):
        obs, info = env.reset(seed=episode)
        done = False
        while not done:
            assert env.observation_space.contains(obs)
            tok.encode(obs)  # raises on a word the env did not declare
            obs, r, term, trunc, info = env.step(int(rng.integers(env.action_space.n)))
            assert {"flawed", "success", "action_mask"} <= set(info)
            assert info["action_mask"].shape == (env.action_space.n,) and info["action_mask"].any()
            done = term or trunc
        assert info["success"] == (r == 1.0)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

def tiny(**kw):
    base = dict(env="text", iters=2, tasks_per_iter=2, num_generations=2, eval_tasks=4, eval_every=1,
                sft_steps=2, threads=1, d_model=32, out="", twin_pairs=4)
    return g.Config(**(base | kw))


def test_rollout_stores_the_log_probs_the_policy_gives_and_one_sample_per_step():
    cfg = tiny(out="unused")
    device, tok, policy, gen, rng = g.build(cfg)
    envs_ = g.make_envs(cfg, 6)
    b = g.rollout(policy, envs_, tok, tasks=np.array([1, 1, 1, 2, 2, 2]), seeds=np.arange(6), gen=gen, device=device)
    assert len(b["action"]) == b["length"].sum() == len(b["tokens"])
    assert np.array_equal(np.bincount(b["traj"], minlength=6), b["length"])
    with torch.no_grad():
        logits = policy(torch.as_tensor(b["tokens"]), torch.as_tensor(b["mask"]))[0]
    logp = torch.log_softmax(logits, -1).gather(1, torch.as_tensor(b["action"])[:, None]).squeeze(1)
    assert np.allclose(logp.numpy(), b["logp"], atol=1e-5)
    assert b["mask"][np.arange(len(b["action"])), b["action"]].all()  # never an inadmissible command


def test_identical_twins_have_cosine_one():
    cfg = tiny(out="unused", cls_weight=0.5)
    device, tok, policy, gen, rng = g.build(cfg)
    p = gym.make(cfg.env).unwrapped.twin_probes()[0]
    same = dict(p, obs_flawed=p["obs_good"], mask_flawed=p["mask_good"])
    d = g.probe_diagnostics(policy, tok, [same], device)
    assert d["grad_cos_twin"] == pytest.approx(1.0, abs=1e-5) and d["embed_cos_good_bad"] == pytest.approx(1.0, abs=1e-5)
    d = g.probe_diagnostics(policy, tok, [p], device)
    assert d["grad_cos_twin"] < 1 - 1e-4 and 0 < d["probe_flawed_prob"] < 1


def test_pair_diagnostics_read_the_policy_at_both_twins_and_give_cosine_one_for_identical_twins():
    """Per sampled pair: pi(a) at each twin as the policy's own softmax gives it, the control as the mean
    pi of the other flawed actions at the flawed twin, and cosines that are 1 where the twins coincide."""
    cfg = tiny(out="unused", cls_weight=0.5)
    device, tok, policy, gen, rng = g.build(cfg)
    pairs = gym.make(cfg.env).unwrapped.twin_pairs(3, seed=0)
    d = g.pair_diagnostics(policy, tok, pairs, device, with_grads=True)
    for k, p in enumerate(pairs):
        for key, side in (("pair_good_probs", "good"), ("pair_flawed_probs", "flawed")):
            x = torch.as_tensor(tok.encode(p[f"obs_{side}"]))[None]
            with torch.no_grad():
                pi = torch.softmax(policy(x, torch.as_tensor(p[f"mask_{side}"].astype(bool))[None])[0][0], -1)
            assert d[key][k] == pytest.approx(pi[p["action"]].item(), rel=1e-5)
        others = [b for b in np.flatnonzero(p["flawed_at_twin"]) if b != p["action"]]
        assert d["pair_control_probs"][k] == pytest.approx(float(pi[others].mean()), rel=1e-5)
        assert -1 <= d["pair_grad_cos"][k] <= 1 and -1 <= d["pair_embed_cos"][k] <= 1
    assert min(d["pair_grad_cos"]) < 1 - 1e-5  # twins one or two words apart: close, but not the same state
    same = [dict(p, obs_flawed=p["obs_good"]) for p in pairs]
    d = g.pair_diagnostics(policy, tok, same, device, with_grads=True)
    assert d["pair_grad_cos"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert d["pair_embed_cos"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert "pair_grad_cos" not in g.pair_diagnostics(policy, tok, pairs, device)  # cheap between evaluations


def test_classifier_is_built_only_when_its_weight_is_positive():
    assert g.build(tiny(out="unused"))[2].cls_head is None
    assert g.build(tiny(out="unused", cls_weight=0.5))[2].cls_head is not None


def test_short_training_run_raises_success_above_the_cold_start(tmp_path):
    """20 GRPO iterations must lift in-domain success well above where the cold start left it."""
    cfg = g.Config(env="text", iters=20, eval_every=20, eval_tasks=64, threads=1, quiet=True,
                   out=str(tmp_path / "run"), seed=0)
    summary = g.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    assert first["iter"] == 0 and last["iter"] == 20
    assert last["success_rate"] >= first["success_rate"] + 0.2, (first["success_rate"], last["success_rate"])
    assert last["flawed_rate"] < first["flawed_rate"]
    assert summary["success_rate"] == last["success_rate"]


# ---------------------------------------------------------------------------------------------
# The command line and the run folder
# ---------------------------------------------------------------------------------------------

def cli(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(HERE, "grpo_cls.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


@pytest.mark.parametrize("args, says", [
    (["--env", "nope"], "--env"), (["--num-generations", "1"], "--num-generations"), (["--lr", "-1"], "--lr"),
    (["--cls-weight", "nan"], "--cls-weight"), (["--scale-rewards", "std"], "--scale-rewards"),
    (["--iters", "x"], "--iters"), (["--shaping", "loop", "--cls-weight", "0.5"], "--shaping"),
    (["--env-kwargs", '{"nope": 1}'], "--env-kwargs"), (["--out", "/proc/x"], "--out /proc/x")])
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(args, says, capsys):
    with pytest.raises(SystemExit) as stop:  # any other exception fails the test: it would be a traceback
        g.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


@pytest.mark.parametrize("args", [["--env-kwargs", '{"nope": 1}'], ["--env", "grid", "--env-kwargs", '{"size": "x"}'],
                                  ["--out", "{tmp}/file/run"], ["--env", "FrozenLake-v1", "--cls-weight", "0.5", "--threads", "1"]])
def test_bad_env_kwargs_or_run_folder_write_nothing(args, tmp_path, capsys):
    """An env constructor that refuses its kwargs, a run folder that cannot be made, or a label source the
    env cannot give (FrozenLake has no oracle): exit 2, and no file or folder is left behind."""
    (tmp_path / "file").write_text("a file, not a folder")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    with pytest.raises(SystemExit) as stop:
        g.main(args + (["--out", str(tmp_path / "run")] if "--out" not in args else []))
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_help_documents_every_config_field():
    out = cli("--help").stdout
    for f in g.dataclasses.fields(g.Config):
        assert "--" + f.name.replace("_", "-") in out


def test_the_flag_table_matches_the_config():
    """docs/flags.md, which the README links, is typed from the Config: every field has a row with its
    default and its help text, so a changed default cannot leave the docs behind."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "flags.md")).read()
    readme = readme.split("| lab flag |")[0]  # the lab's table, below the method's, is studies/test_arms.py's
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| `(--[a-z-]+)` \| (.*?) \| (.*) \|$",
                                                                      readme, flags=re.M)}
    for f in g.dataclasses.fields(g.Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in rows, f"docs/flags.md: no row for {flag}"
        default, meaning = rows[flag]
        if isinstance(f.default, bool):
            assert default == ("on" if f.default else "off"), flag
        elif f.default != "":  # "" reads as (derived) or (none)
            assert default == str(f.default), f"docs/flags.md: {flag} default {default}, Config says {f.default}"
        assert meaning.startswith(f.metadata["help"]), flag


def test_cli_smoke_run_writes_the_whole_run_folder(tmp_path):
    out = tmp_path / "run"
    r = cli("--iters", "3", "--tasks-per-iter", "2", "--num-generations", "2", "--eval-tasks", "4",
            "--eval-every", "1", "--sft-steps", "3", "--cls-weight", "0.5", "--cls-labels", "oracle", "--threads", "1",
            "--twin-pairs", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png", "coupling.png",
                 "probe_heatmap.png", "episode_train_iter0002.txt", "episode_ood_iter0002.txt"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    keys = ("iter env_steps wall_s success_rate ood_success_rate flawed_rate ood_flawed_rate probe_flawed_prob "
            "grad_cos_twin embed_cos_good_bad adv_flawed_mean adv_good_mean zero_std_frac cls_acc pg_loss "
            "cls_loss kl entropy clip_frac").split()
    assert [r["iter"] for r in rows] == [0, 1, 2, 3] and all(set(keys) <= set(row) for row in rows)
    assert all(len(r["pair_flawed_probs"]) == len(r["pair_embed_cos"]) == 5 for r in rows)  # the sampled pairs
    assert all(r["pair_grad_cos"] is not None for r in rows)  # every iteration evaluates here (--eval-every 1)
    # beta = 0: no reference, so kl is null; oracle labels label every step
    assert rows[-1]["kl"] is None and rows[-1]["cls_labelled_frac"] == 1.0
    again = cli("--iters", "1", "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


# ---------------------------------------------------------------------------------------------
# Trustworthy runs: reproducible, resumable, interruptible, safe on bad input
# ---------------------------------------------------------------------------------------------

UPDATING = ["--tasks-per-iter", "8", "--num-generations", "8", "--env", "grid", "--sft-steps", "0"]  # groups differ
TINY_ARGS = ["--twin-pairs", "4", "--iters", "4", "--tasks-per-iter", "2", "--num-generations", "3",
             "--eval-tasks", "4", "--eval-every", "2", "--sft-steps", "5", "--cls-weight", "0.5", "--threads", "1", "--quiet"]


MEASURED = ("wall_s", "rss_mib", "peak_rss_mib", "time_rollout_s", "time_update_s", "time_eval_s", "time_diag_s")


def rows_without_wall_time(run_dir):
    """Every metric but the clock and memory readings, which no run can repeat."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def test_same_seed_and_config_give_identical_metrics(tmp_path):
    args = TINY_ARGS + UPDATING  # groups that differ: the runs update, so there is something to repeat
    g.main(args + ["--out", str(tmp_path / "a")])
    g.main(args + ["--out", str(tmp_path / "b")])
    a, b = rows_without_wall_time(tmp_path / "a"), rows_without_wall_time(tmp_path / "b")
    assert len(a) == 5 and a == b and sum(r["opt_steps"] for r in a[1:]) > 0  # every key but the clocks
    g.main(args + ["--out", str(tmp_path / "c"), "--seed", "2"])
    assert rows_without_wall_time(tmp_path / "c") != a
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    assert {"torch", "numpy", "gymnasium", "device", "threads", "seed", "lr"} <= set(cfg)



@pytest.mark.parametrize("extra", [[], ["--beta", "0.1", "--num-iterations", "2", "--cls-labels", "advantage"]])
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, extra):
    """Stopped after 2 of 4 iterations and resumed, a run is the run that never stopped. With a constant
    learning rate, since an annealed one is fixed by --iters (test_resume_refuses_...)."""
    args = TINY_ARGS + UPDATING + ["--anneal-lr", "0"] + extra
    g.main(args + ["--out", str(tmp_path / "straight")])
    g.main(args + ["--iters", "2", "--out", str(tmp_path / "split")])  # the later --iters wins
    assert len(rows_without_wall_time(tmp_path / "split")) == 3
    g.main(["--resume", str(tmp_path / "split"), "--iters", "4", "--quiet"])
    rows = rows_without_wall_time(tmp_path / "straight")
    assert rows_without_wall_time(tmp_path / "split") == rows
    assert any(r["opt_steps"] > 0 for r in rows[3:])  # an update after the resume: the test can see a difference
    if "--beta" in extra:
        assert all(r["kl"] > 0 for r in rows[3:] if r["opt_steps"])  # the reference is the cold start; pi left it
    if "--num-iterations" in extra:
        assert all(r["opt_steps"] == 2 * math.ceil(r["update_samples"] / 2 / 64) for r in rows[1:])


def test_resume_refuses_to_change_the_annealed_length_or_to_turn_on_the_kl(tmp_path):
    g.main(TINY_ARGS + ["--iters", "2", "--out", str(tmp_path / "run")])
    for flags, says in ((["--iters", "4"], "cannot change --iters"), (["--beta", "0.1"], "cannot turn on --beta")):
        r = cli("--resume", str(tmp_path / "run"), *flags)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_resume_refuses_a_checkpoint_trained_by_the_older_update(tmp_path, capsys):
    """A run trained with one clip on the summed gradient (no "update" in its checkpoint) cannot continue
    under the per-stream clip: the result would be neither."""
    g.main(TINY_ARGS + ["--iters", "2", "--anneal-lr", "0", "--out", str(tmp_path / "run")])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    del ckpt["update"]
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        g.main(["--resume", str(tmp_path / "run"), "--iters", "3", "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "trained by update 1" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "grpo_cls.py"), "--iters", "500", "--sft-steps", "5",
                             "--threads", "1", "--quiet", "--eval-every", "1000", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    deadline = time.time() + 60

    def rows_written():
        return len(open(out / "metrics.jsonl").read().splitlines()) if (out / "metrics.jsonl").exists() else 0
    while time.time() < deadline and proc.poll() is None and rows_written() < 3:
        time.sleep(0.2)
    assert proc.poll() is None and rows_written() >= 3, "the run died or stalled before its third row"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    ckpt = g.load_checkpoint(str(out))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert ckpt["iter"] == rows[-1]["iter"] >= 2 and len(ckpt["metrics"]) == len(rows)
    assert not (out / "summary.json").exists()  # written only by a run that reached --iters


def test_truncated_checkpoint_or_changed_shape_exit_2_with_one_line(tmp_path):
    g.main(TINY_ARGS + ["--out", str(tmp_path / "run")])
    r = cli("--resume", str(tmp_path / "run"), "--d-model", "32")
    assert r.returncode == 2 and "d_model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:2000])
    r = cli("--resume", str(tmp_path / "run"))
    assert r.returncode == 2 and "corrupted" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_non_finite_loss_stops_the_run_naming_iteration_and_term(tmp_path, monkeypatch):
    monkeypatch.setattr(g, "clipped_surrogate", lambda logp, logp_old, A, eps: logp * float("nan"))
    monkeypatch.setattr(g, "informative_steps", lambda batch, G: np.arange(len(batch["traj"])))  # an update runs
    cfg = tiny(out=str(tmp_path / "run"), quiet=True)
    with pytest.raises(g.TrainingError, match="iteration 1: pg_loss is not finite"):
        g.train(cfg)
    assert g.load_checkpoint(str(tmp_path / "run"))["iter"] == 0  # the last good checkpoint is intact


def test_any_gymnasium_env_trains_frozen_lake(tmp_path):
    cfg = g.Config(env="FrozenLake-v1", env_kwargs='{"is_slippery": false}', iters=30, eval_every=30,
                   eval_tasks=16, threads=1, quiet=True, out=str(tmp_path / "run"))
    s = g.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["eval_return"] < 0.5 and s["eval_return"] >= 0.9
    assert s["success_rate"] is None and s["flawed_rate"] is None and s["probe_flawed_prob"] is None


def test_unsupported_spaces_get_a_one_line_error():
    r = cli("--env", "CartPole-v1", "--iters", "1", "--out", "/tmp/grpo_cls_cartpole_never")
    assert r.returncode == 2 and "supported: Discrete, MultiDiscrete" in r.stderr and "Traceback" not in r.stderr
    r = cli("--env-kwargs", "[1, 2]")
    assert r.returncode == 2 and "JSON object" in r.stderr


# ---------------------------------------------------------------------------------------------
# Property-based: no action sequence can break an env or its promises
# ---------------------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

ACTION = st.one_of(st.integers(-3, 40), st.floats(allow_nan=True), st.text(max_size=2), st.none())


@settings(max_examples=300, deadline=None)
@given(env_id=st.sampled_from(ENV_IDS), split=st.sampled_from(["train", "heldout"]), task=st.integers(0, 10**6),
       seed=st.integers(0, 2**31 - 1), actions=st.lists(ACTION, max_size=25))
def test_random_actions_never_break_an_env_or_its_promises(env_id, split, task, seed, actions):
    env = gym.make(env_id, split=split).unwrapped
    obs, info = env.reset(seed=seed, options={"task": task})
    for a in actions:
        if not env.action_space.contains(a):
            with pytest.raises(ValueError, match="outside the action space"):
                env.step(a)
            continue
        a = int(a)
        if "Kitchen" in env_id:
            inadmissible = not env.admissible(env.state, env.commands[a])
            expected = env.is_flawed(env.commands[a])
        else:
            expected = env.is_flawed(env.agent, a)
        obs, r, term, trunc, info = env.step(a)
        assert env.observation_space.contains(obs)
        assert {"flawed", "success", "action_mask"} <= set(info) and info["flawed"] == expected
        assert info["action_mask"].dtype == np.int8 and info["action_mask"].any()
        if "Kitchen" in env_id and inadmissible:
            assert info["flawed"] and obs.endswith("nothing happens .")
        assert r == float(info["success"]) and not (term and trunc)
        if term or trunc:
            break


# ---------------------------------------------------------------------------------------------
# Device selection (CI has no GPU: the CUDA path itself is measured by `python -m studies.bench --device cuda`)
# ---------------------------------------------------------------------------------------------

def test_device_auto_falls_back_to_cpu_and_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, *_ = g.build(tiny(out="unused", device="auto"))
    assert device.type == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        tiny(out="unused", device="cuda")


def test_device_auto_picks_cuda_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert g.pick_device("auto") == "cuda" and g.pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert g.pick_device("auto") == "cpu"


# ---------------------------------------------------------------------------------------------
# The fair update: the classifier changes only the term it adds, and that term does its job
# ---------------------------------------------------------------------------------------------

POLICY_METRICS = ("train_success_rate", "train_flawed_rate", "success_rate", "ood_success_rate", "flawed_rate",
                  "ood_flawed_rate", "probe_flawed_probs", "probe_control_probs", "grad_cos_twin_each",
                  "embed_cos_good_bad", "probe_action_probs", "adv_flawed_mean", "adv_good_mean", "zero_std_frac",
                  "pg_loss", "entropy", "clip_frac", "eval_return", "update_samples", "opt_steps", "env_steps")
FAIR = dict(env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, iters=3, quiet=True)  # groups differ


def trained(cfg):
    """Train cfg; returns (policy parameters, metric rows)."""
    g.train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    return g.load_checkpoint(cfg.out)["model"], rows


@pytest.mark.parametrize("labels", ["oracle", "advantage"])
def test_fair_update_a_classifier_weighted_zero_trains_the_policy_bit_for_bit_as_plain_grpo(tmp_path, monkeypatch,
                                                                                            labels):
    """The classifier is built, labelled and in the loss, but its term is multiplied by 0: the policy's
    parameters and every policy metric must then equal plain GRPO's exactly. A sample rule, a mean or a
    step count that depended on the labels would break it (the policy stream would see other minibatches)."""
    plain_params, plain_rows = trained(tiny(out=str(tmp_path / "plain"), **FAIR))
    real = g.classification_loss
    monkeypatch.setattr(g, "classification_loss", lambda c, y, labelled: 0.0 * real(c, y, labelled))
    arm_params, arm_rows = trained(tiny(out=str(tmp_path / "arm"), cls_weight=0.5, cls_labels=labels, **FAIR))
    for name, value in plain_params.items():
        assert torch.equal(arm_params[name], value), name
    for p_row, a_row in zip(plain_rows, arm_rows, strict=True):
        assert {k: p_row[k] for k in POLICY_METRICS} == {k: a_row[k] for k in POLICY_METRICS}
    assert all(r["cls_labelled_frac"] > 0 and r["cls_loss"] == 0 for r in arm_rows[1:])  # labelled, in the loss
    assert max(r["opt_steps"] for r in arm_rows[1:]) >= 2  # several minibatches: their order is checked too


def random_grid_batch(cfg):
    """One rollout of a fresh policy on 8 grid tasks x 8: some groups succeed and fail, so A != 0."""
    device, tok, policy, gen, rng = g.build(cfg)
    batch = g.rollout(policy, g.make_envs(cfg, 64), tok, np.repeat(np.arange(8), 8), np.arange(64), gen, device)
    R = torch.as_tensor(batch["reward"], dtype=torch.float32).view(8, 8)
    return batch, g.group_advantages(R).view(-1)[torch.as_tensor(batch["traj"])]


def run_of(cfg, optimizer=torch.optim.Adam, **opt_kw):
    """A fresh policy, its optimizer and generators, as train() holds them."""
    device, tok, policy, gen, rng = g.build(cfg)
    cls_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    return g.RunState(cfg, policy, optimizer(policy.parameters(), **opt_kw), None, gen, rng, cls_gen)


def test_each_stream_is_clipped_on_its_own_so_a_large_classifier_gradient_never_shrinks_the_policy_step():
    """One SGD step on one minibatch, plain GRPO against a classifier weighted 1000. The policy head is
    reached by the policy gradient only, so its step must be the same bit for bit: with one clip on the
    summed gradient, the classifier's norm would shrink it."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, minibatch_size=4096)
    batch, A = random_grid_batch(cfg)
    heads, logs = {}, {}
    for w in (0.0, 1000.0):
        arm = dataclasses.replace(cfg, cls_weight=w)
        run = run_of(arm, torch.optim.SGD, lr=1.0)
        before = run.policy.policy_head.weight.detach().clone()
        labels = g.classifier_labels(arm, batch, A) if w else None
        logs[w] = g.grpo_update(run, batch, A, labels)
        heads[w] = run.policy.policy_head.weight.detach() - before
        stats = g.update_stats(logs[w], run, batch, labels)
        assert (stats["cos_v_w"] is None) == (w == 0)
    assert len(logs[0.0]) == len(logs[1000.0]) == 1
    assert heads[0.0].abs().sum() > 0 and torch.equal(heads[0.0], heads[1000.0])
    assert logs[0.0][0]["pg_grad_norm"] == logs[1000.0][0]["pg_grad_norm"]
    assert logs[1000.0][0]["cls_grad_norm"] > 1 and logs[0.0][0]["cls_grad_norm"] == 0  # clipped, not shrinking pg


def test_a_non_finite_classifier_gradient_is_caught_before_it_reaches_the_policy():
    """The classifier's gradient is clipped on its own, so an inf there would turn into NaN weights
    (inf * 0) without the policy-gradient norm ever seeing it: its own norm is checked too."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=1e39)
    batch, A = random_grid_batch(cfg)
    run = run_of(cfg)
    labels = g.classifier_labels(cfg, batch, A)
    stats = g.update_stats(g.grpo_update(run, batch, A, labels), run, batch, labels)
    assert stats["nonfinite"] == "cls_grad_norm"
    with pytest.raises(g.TrainingError, match="cls_grad_norm is not finite"):
        g.check_finite(stats, 1, cfg)


def test_the_classifier_stream_runs_in_pieces_of_at_most_a_minibatch_with_the_loss_and_gradient_of_one_pass():
    """However few policy minibatches an iteration has, the classifier's share of labelled steps is
    forwarded minibatch_size samples at a time (peak memory stays flat; the last piece padded), with the
    same mean loss and gradient as one forward over the whole share."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, minibatch_size=64,
               cls_weight=0.5)
    batch, A = random_grid_batch(cfg)
    policy = g.build(cfg)[2]
    x, m, a = (torch.as_tensor(batch[k]) for k in ("tokens", "mask", "action"))
    y, labelled = g.classifier_labels(cfg, batch, A)  # oracle labels
    jdx, params, sizes = torch.arange(150), list(policy.parameters()), []
    real = policy.forward
    policy.forward = lambda xs, ms: sizes.append(len(xs)) or real(xs, ms)
    c, cls_loss, grads = g.classifier_stream(policy, cfg, x, m, a, y, labelled, jdx, params)
    assert sizes == [64, 64, 64] and c.shape == (150,)
    for n, pieces in ((10, [64]), (128, [64, 64])):  # a short share is padded; an exact multiple is not
        sizes.clear()
        assert g.classifier_stream(policy, cfg, x, m, a, y, labelled, jdx[:n], params)[0].shape == (n,)
        assert sizes == pieces
    one_pass = real(x[jdx], m[jdx])[2].gather(1, a[jdx][:, None]).squeeze(1)
    whole = g.classification_loss(one_pass, y[jdx], labelled[jdx])
    assert cls_loss.item() == pytest.approx(whole.item(), rel=1e-5)
    assert torch.allclose(c, one_pass, atol=1e-5)
    for mine, theirs in zip(grads, torch.autograd.grad(0.5 * whole, params, allow_unused=True), strict=True):
        assert (mine is None) == (theirs is None)
        assert mine is None or torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)


def test_informative_steps_are_the_steps_of_groups_whose_outcomes_differ():
    batch = {"reward": np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), "traj": np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])}
    assert g.informative_steps(batch, G=2).tolist() == [3, 4, 5]  # groups (0, 1) and (4, 5) tie


def test_an_update_on_tied_groups_takes_no_step():
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=0.5)
    batch, A = random_grid_batch(cfg)
    batch = batch | {"reward": np.zeros_like(batch["reward"])}  # every group ties
    run = run_of(cfg)
    before = [p.detach().clone() for p in run.policy.parameters()]
    labels = g.classifier_labels(cfg, batch, A)
    stats = g.update_stats(g.grpo_update(run, batch, A, labels), run, batch, labels)
    assert stats["opt_steps"] == stats["update_samples"] == 0 and stats["pg_loss"] is None
    assert all(torch.equal(p, q) for p, q in zip(run.policy.parameters(), before))


def test_the_kl_term_pulls_the_policy_toward_the_reference_and_only_with_beta():
    """With every advantage 0 the clipped surrogate has no gradient: an update then moves the policy only
    through beta * kl, toward a reference it differs from, and not at all with beta = 0."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0)
    batch, A = random_grid_batch(cfg)
    A = torch.zeros_like(A)
    moved = {}
    for beta in (0.0, 1.0):
        run = run_of(dataclasses.replace(cfg, beta=beta), torch.optim.SGD, lr=0.1)
        ref = copy.deepcopy(run.policy).requires_grad_(False)
        with torch.no_grad():
            ref.policy_head.weight.mul_(-1.0)  # a reference the policy differs from
        run.ref = ref
        x, m, a = (torch.as_tensor(batch[k]) for k in ("tokens", "mask", "action"))
        kl = lambda: g.kl_k3(torch.log_softmax(run.policy(x, m)[0], -1).gather(1, a[:, None]).squeeze(1),  # noqa: E731
                             torch.log_softmax(ref(x, m)[0], -1).gather(1, a[:, None]).squeeze(1)).mean().item()
        before = kl()
        logs = g.grpo_update(run, batch, A, None)
        moved[beta] = before - kl()
        assert all(step["kl"] > 0 for step in logs)
    assert moved[0.0] == 0 and moved[1.0] > 0


def test_update_stats_reduce_the_steps_logs_as_their_names_say():
    """Two optimizer steps' logs, written by hand: means of the terms, the share of clipped steps, the
    classifier's accuracy over every verdict of the steps that had one, and the first non-finite term."""
    cfg = tiny(out="unused", cls_weight=0.5, max_grad_norm=1.0)
    run = run_of(cfg)
    t = lambda *v: torch.tensor(v)  # noqa: E731
    step = dict(pg_loss=t(1.0), kl=t(0.0), entropy=t(2.0), clip_frac=t(0.5), cls_loss=t(0.0),
                cls_grad_norm=t(0.0), c=None, y=None, flawed=None)
    logs = [step | dict(pg_grad_norm=t(0.5)),
            step | dict(pg_loss=t(3.0), pg_grad_norm=t(2.0), cls_loss=t(0.7), c=t(1.0, -1.0, 2.0),
                        y=t(1.0, 1.0, 0.0), flawed=t(True, False, False))]
    labels = (t(1.0, 1.0, 0.0, 0.0), t(True, True, True, False))
    batch = {"reward": np.array([1.0, 0.0]), "traj": np.array([0, 0, 1, 1]), "has_oracle": True}
    stats = g.update_stats(logs, run, batch, labels)
    assert stats["pg_loss"] == 2.0 and stats["pg_grad_norm"] == 1.25 and stats["grad_clipped_frac"] == 0.5
    assert stats["cls_loss"] == pytest.approx(0.7) and stats["cls_labelled_frac"] == 0.75
    assert stats["cls_acc"] == pytest.approx(1 / 3) and stats["cls_oracle_acc"] == pytest.approx(2 / 3)
    assert stats["kl"] is None and stats["nonfinite"] is None and stats["opt_steps"] == 2
    logs[1]["cls_grad_norm"] = t(float("inf"))
    assert g.update_stats(logs, run, batch, labels)["nonfinite"] == "cls_grad_norm"


def test_the_classifier_term_alone_learns_the_oracle_and_pulls_the_twins_apart():
    """With every advantage 0 the policy gradient is off: whatever changes is the classifier's doing.
    A few epochs of the classification term must lift its agreement with the oracle well above the
    better constant guess, and lower the cosine of the twin probes' pair embeddings phi(s_good, a) and
    phi(s_flawed, a)."""
    cfg = tiny(out="unused", env="text", cls_weight=1.0, tasks_per_iter=16, num_generations=8, sft_steps=100,
               seed=0, num_iterations=20)
    device, tok, policy, gen, rng = g.build(cfg)
    envs_ = g.make_envs(cfg, 128)
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
    batch = g.rollout(policy, envs_, tok, np.repeat(np.arange(16), 8), np.arange(128), gen, device)
    x, m = torch.as_tensor(batch["tokens"]), torch.as_tensor(batch["mask"])
    a, flawed = torch.as_tensor(batch["action"]), torch.as_tensor(batch["flawed"])

    def agreement():
        with torch.no_grad():
            c = policy(x, m)[2].gather(1, a[:, None]).squeeze(1)
        return ((c > 0) == flawed).float().mean().item()

    probes = gym.make(cfg.env).unwrapped.twin_probes()
    before, embed_before = agreement(), g.probe_diagnostics(policy, tok, probes, device)["embed_cos_good_bad"]
    constant_guess = max(flawed.float().mean().item(), 1 - flawed.float().mean().item())
    run = g.RunState(cfg, policy, torch.optim.Adam(policy.parameters(), lr=1e-3), None, gen, rng,
                     torch.Generator().manual_seed(1))
    A = torch.zeros(len(a))
    batch["reward"][0] = 1.0 - batch["reward"][0]  # one untied group, so that the update takes its steps
    g.grpo_update(run, batch, A, g.classifier_labels(cfg, batch, A))
    after, embed_after = agreement(), g.probe_diagnostics(policy, tok, probes, device)["embed_cos_good_bad"]
    assert after >= constant_guess + 0.1, (before, after, constant_guess)
    assert embed_after < embed_before - 0.05, (embed_before, embed_after)  # the twins' phi moved apart


def test_kitchen_state_key_leaves_out_the_action_history():
    env = gym.make("grpo_cls/Kitchen-v0").unwrapped
    _, info = env.reset(options={"task": 3})
    look = env.commands.index("look")
    obs, _, _, _, after = env.step(look)
    assert "history" in obs and "look" in obs and after["state_key"] == info["state_key"] and after["flawed"]


def test_unmasked_kitchen_lets_the_policy_waste_steps_on_inadmissible_commands(tmp_path):
    """--action-mask none: the policy's softmax spans all 33 commands; an inadmissible one answers
    "nothing happens", costs a step and is flawed, and train_invalid_rate counts them."""
    cfg = tiny(out=str(tmp_path / "run"), action_mask="none", tasks_per_iter=4, num_generations=4, quiet=True)
    device, tok, policy, gen, rng = g.build(cfg)
    envs_ = g.make_envs(cfg, 16)
    b = g.rollout(policy, envs_, tok, np.repeat([1, 2, 3, 4], 4), np.arange(16), gen, device, use_mask=False)
    invalid = ~b["admissible"]
    assert b["mask"].all() and invalid.any() and b["flawed"][invalid].all()
    masked = g.rollout(policy, envs_, tok, np.repeat([1, 2, 3, 4], 4), np.arange(16), gen, device)
    assert masked["admissible"].all()
    g.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][1:]
    assert all(0 < r["train_invalid_rate"] < 1 for r in rows)


def test_the_summary_sets_each_measure_beside_plain_grpos_including_the_twins_cosines(capsys):
    keys = ("success_rate", "ood_success_rate", "flawed_rate", "ood_flawed_rate", "probe_flawed_prob",
            "grad_cos_twin", "embed_cos_good_bad", "eval_return")
    s = {"iters": 45, "env_steps": 1000, "wall_s": 60.0, "baseline": "results/reference/text-plain-seed1"}
    s |= {f"initial_{k}": 0.5 for k in ("success_rate", "ood_success_rate", "flawed_rate", "eval_return")}
    s |= {k: 0.1 + i / 100 for i, k in enumerate(keys)} | {f"baseline_{k}": 0.6 + i / 100 for i, k in enumerate(keys)}
    g.print_summary(s, tiny(out="unused", cls_weight=0.5))
    rows = {line[:34].strip(): line[34:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["grad cos of the twins"] == ["0.150", "0.650"] and rows["embed cos of the twins"] == ["0.160", "0.660"]
    assert rows["flawed rate, in-domain"] == ["0.120", "0.620"]


def test_a_classifier_run_is_set_beside_a_stored_plain_run_from_the_same_cold_start(tmp_path, capsys):
    """--baseline: the summary carries the plain run's final numbers and vs_plain.png is drawn, only when
    the stored run is this config but for the classifier, and shares its iteration 0."""
    args = TINY_ARGS  # a later --cls-weight overrides its 0.5
    g.main(args + ["--cls-weight", "0", "--out", str(tmp_path / "plain"), "--baseline", "none"])
    plain = json.load(open(tmp_path / "plain" / "summary.json"))
    g.main(args + ["--cls-weight", "0.5", "--out", str(tmp_path / "cls"), "--baseline", str(tmp_path / "plain")])
    s = json.load(open(tmp_path / "cls" / "summary.json"))
    assert s["baseline_flawed_rate"] == plain["flawed_rate"] and s["baseline_success_rate"] == plain["success_rate"]
    assert (tmp_path / "cls" / "vs_plain.png").exists()
    g.main(args + ["--cls-weight", "0.5", "--seed", "2", "--out", str(tmp_path / "other"),
                   "--baseline", str(tmp_path / "plain")])
    assert "differs in seed" in capsys.readouterr().err
    assert "baseline" not in json.load(open(tmp_path / "other" / "summary.json"))
    g.main(args + ["--cls-weight", "0.5", "--out", str(tmp_path / "cls2"), "--baseline", str(tmp_path / "cls")])
    assert "is not plain GRPO" in capsys.readouterr().err  # a classifier run is no baseline
    rows = (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(rows[0]) | {"flawed_rate": 0.5}  # as if plain GRPO had started from another cold start
    (tmp_path / "plain" / "metrics.jsonl").write_text("\n".join([json.dumps(first)] + rows[1:]))
    g.main(args + ["--cls-weight", "0.5", "--out", str(tmp_path / "cls3"), "--baseline", str(tmp_path / "plain")])
    assert "another cold start" in capsys.readouterr().err


def test_vs_plain_trains_both_arms_from_one_cold_start_and_each_equals_its_own_lone_run(tmp_path, capsys):
    """make run's pair: plain GRPO into <out>/plain, then the classifier from that run's cold start. Each is
    bit for bit the run it would be alone, so computing the cold start once changes nothing; the summary
    carries both columns, the paired endpoint and a verdict line, and vs_plain.png is drawn."""
    args = TINY_ARGS + UPDATING  # groups that differ: both arms update
    g.main(args + ["--vs-plain", "--out", str(tmp_path / "pair")])
    g.main(args + ["--baseline", "none", "--out", str(tmp_path / "cls")])
    g.main(args + ["--cls-weight", "0", "--out", str(tmp_path / "plain")])
    assert rows_without_wall_time(tmp_path / "pair") == rows_without_wall_time(tmp_path / "cls")
    assert rows_without_wall_time(tmp_path / "pair" / "plain") == rows_without_wall_time(tmp_path / "plain")
    s = json.load(open(tmp_path / "pair" / "summary.json"))
    plain = json.load(open(tmp_path / "plain" / "summary.json"))
    assert s["baseline_flawed_rate"] == plain["flawed_rate"]
    assert s["baseline_late_train_flawed_rate"] == plain["late_train_flawed_rate"] is not None
    assert (tmp_path / "pair" / "vs_plain.png").exists() and (tmp_path / "pair" / "cold_start.pt").exists() is False
    g.print_summary(s, tiny(out=str(tmp_path / "pair"), cls_weight=0.5))
    out = capsys.readouterr().out
    assert "GRPO + cls  plain GRPO" in out and "lower flawed rate in the last 10 training batches" in out


def test_vs_plain_is_refused_in_one_line_without_a_classifier_or_with_resume(tmp_path, capsys):
    g.main(TINY_ARGS + ["--iters", "2", "--out", str(tmp_path / "run")])  # a folder with a checkpoint
    capsys.readouterr()
    for extra in (["--cls-weight", "0"], ["--resume", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as e:
            g.parse_args(TINY_ARGS + ["--iters", "2", "--vs-plain", "--out", str(tmp_path / "x")] + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--vs-plain needs --cls-weight > 0 and no --resume" in err


def test_the_classifier_arm_of_a_pair_resumes_exactly_as_its_uninterrupted_run(tmp_path):
    """Stopped after 2 iterations, a pair's classifier arm is a run of its own: --resume continues it, still set
    beside its plain arm, bit for bit as a classifier run that never stopped."""
    args = TINY_ARGS + UPDATING + ["--anneal-lr", "0"]
    g.main(args + ["--baseline", "none", "--out", str(tmp_path / "straight")])
    g.main(args + ["--vs-plain", "--iters", "2", "--out", str(tmp_path / "pair")])
    g.main(["--resume", str(tmp_path / "pair"), "--iters", "4", "--quiet"])
    assert rows_without_wall_time(tmp_path / "pair") == rows_without_wall_time(tmp_path / "straight")
    assert json.load(open(tmp_path / "pair" / "config.json"))["baseline"] == str(tmp_path / "pair" / "plain")


def test_the_paired_endpoint_is_the_mean_training_flawed_rate_of_the_last_10_iterations():
    rows = [{"iter": 0, "train_flawed_rate": None}] + [{"iter": i, "train_flawed_rate": i / 100} for i in range(1, 16)]
    assert g.late_flawed_rate(rows, 15) == pytest.approx(np.mean(np.arange(6, 16) / 100))
    assert g.late_flawed_rate(rows, 4) == pytest.approx(np.mean([0.01, 0.02, 0.03, 0.04]))  # a short run: all
    assert g.late_flawed_rate(rows[:1], 0) is None


def test_a_stored_reference_from_another_cold_start_is_refused_with_a_line_that_says_how_to_regenerate_it(
        tmp_path, capsys, monkeypatch):
    """--baseline auto (the default): a stored plain run that no longer matches, as on another CPU, is never
    dropped silently."""
    ref = tmp_path / "results" / "reference" / "text-plain-seed1"
    g.main(TINY_ARGS + ["--cls-weight", "0", "--out", str(ref), "--baseline", "none"])
    rows = (ref / "metrics.jsonl").read_text().splitlines()
    first = json.loads(rows[0]) | {"probe_flawed_prob": 0.5}  # iteration 0 differs in roundoff elsewhere
    (ref / "metrics.jsonl").write_text("\n".join([json.dumps(first)] + rows[1:]))
    monkeypatch.setattr(g, "HERE", str(tmp_path))
    capsys.readouterr()
    g.main(TINY_ARGS + ["--cls-weight", "0.5", "--out", str(tmp_path / "cls"), "--seed", "1"])
    err = capsys.readouterr().err
    assert "starts from another cold start" in err and "make reference" in err
    assert len([line for line in err.splitlines() if line.startswith("note:")]) == 1
    assert "baseline" not in json.load(open(tmp_path / "cls" / "summary.json"))
    (ref / "metrics.jsonl").write_text("\n".join(rows))  # the same cold start, but made by the older update
    config = json.loads((ref / "config.json").read_text())
    del config["update"]
    (ref / "config.json").write_text(json.dumps(config))
    g.main(TINY_ARGS + ["--cls-weight", "0.5", "--out", str(tmp_path / "cls2"), "--seed", "1"])
    err = capsys.readouterr().err
    assert "older update" in err and "make reference" in err
    g.main(TINY_ARGS + ["--cls-weight", "0.5", "--out", str(tmp_path / "cls3"), "--seed", "1", "--lr", "0.002"])
    err = capsys.readouterr().err  # another config: a note, but make reference would not help
    assert "differs in lr" in err and "make reference" not in err


# ---------------------------------------------------------------------------------------------
# The code reads as a text: top to bottom, in pieces a reader can hold
# ---------------------------------------------------------------------------------------------

def module_level_forward_references(path: str) -> list[tuple[str, str]]:
    """(definition, name) for every module-level name that a top-level definition of `path` reads but
    that is defined further down the file. Type hints do not count: they are never evaluated here."""
    tree = ast.parse(open(path).read())
    first_line = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            getattr(node, "targets", [getattr(node, "target", None)])
        for t in targets:
            for bound in getattr(t, "elts", [t]):  # A, B = ... binds both
                name = getattr(bound, "name", getattr(bound, "id", None))
                if name:
                    first_line.setdefault(name, node.lineno)
    hints = set()
    for node in ast.walk(tree):
        annotations = [getattr(node, "annotation", None), getattr(node, "returns", None)]
        if isinstance(node, ast.FunctionDef):
            annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs]
        hints |= {id(n) for ann in annotations if ann is not None for n in ast.walk(ann)}
    return sorted({(getattr(node, "name", "?"), n.id) for node in tree.body for n in ast.walk(node)
                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in hints
                   and first_line.get(n.id, 0) > node.lineno})


def test_the_code_reads_top_to_bottom_no_name_is_used_above_its_definition(tmp_path):
    """A student reads grpo_cls.py, envs.py, every adapter and every study from the top and never needs a name defined
    further down (the test files, which are specifications, aside)."""
    code = ["grpo_cls.py", "envs.py"] + sorted(f"{d}/{f}" for d in ("studies", "worlds", "bridge")
                                               for f in os.listdir(os.path.join(HERE, d))
                                               if f.endswith(".py") and not f.startswith("test_"))
    assert {f: module_level_forward_references(os.path.join(HERE, f)) for f in code} == {f: [] for f in code}
    later = tmp_path / "later.py"  # the check itself bites: a use above the definition is found
    later.write_text("def first():\n    return second() + LATE\n\n\ndef second(x: 'Hint') -> int:\n    return 1\n\n\n"
                     "class Hint:\n    pass\n\n\nEARLY, LATE = 1, 2\n")
    assert module_level_forward_references(str(later)) == [("first", "LATE"), ("first", "second")]


def test_no_function_in_any_file_is_longer_than_80_lines():
    files = sorted(f for f in os.listdir(HERE) if f.endswith(".py"))
    files += sorted(f"{d}/{f}" for d in ("studies", "worlds", "bridge")
                    for f in os.listdir(os.path.join(HERE, d))
                    if f.endswith(".py"))
    long = [(f, node.name, node.end_lineno - node.lineno + 1) for f in files
            for node in ast.walk(ast.parse(open(os.path.join(HERE, f)).read()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80]
    assert long == []

# ---------------------------------------------------------------------------------------------
# MiniGrid rooms (an optional install): the search's model of MiniGrid, its plans and its oracle, held
# to brute force with MiniGrid's own step; the words the policy reads; the twin pairs
# ---------------------------------------------------------------------------------------------

ROOMS = [f"grpo_cls/{name}" for name in envs.MINIGRID_ROOMS]  # Empty-5x5, LavaGapS5, DoorKey-5x5


def noisy_action(env, rng, noise: float) -> int:
    """The scripted agent: a random action with chance `noise`, else the oracle's optimal one."""
    return int(rng.integers(minigrid_world.N_ACTIONS)) if rng.random() < noise else env.unwrapped.optimal_action()


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
            for a in range(minigrid_world.N_ACTIONS):
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
    assert [a.value for a in Actions] == [minigrid_world.LEFT, minigrid_world.RIGHT, minigrid_world.FORWARD, minigrid_world.PICKUP, minigrid_world.DROP,
                                          minigrid_world.TOGGLE, minigrid_world.DONE]
    assert [tuple(int(v) for v in d) for d in DIR_TO_VEC] == list(minigrid_world.HEADINGS)


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
            fixed, before = minigrid_world.read_room(room)
            a = int(rng.integers(minigrid_world.N_ACTIONS))
            predicted = minigrid_world.room_step(dict(fixed), before, a)
            _, _, term, trunc, _ = room.step(a)
            assert minigrid_world.read_room(room)[1] == predicted, f"seed {episode}: action {a} from {before}"
            effects.add((a, predicted != before))
            done = term or trunc
    changes = {a for a, changed in effects if changed}
    assert {minigrid_world.LEFT, minigrid_world.RIGHT, minigrid_world.FORWARD} <= changes and {minigrid_world.FORWARD, minigrid_world.DONE} <= {a for a, c in effects if not c}
    if "DoorKey" in env_id:
        assert {minigrid_world.PICKUP, minigrid_world.DROP, minigrid_world.TOGGLE} <= changes


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
            for b in range(minigrid_world.N_ACTIONS):
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
    assert checked >= 3 * minigrid_world.N_ACTIONS


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
    assert {minigrid_world.cell_word(o, c, s) for o in OBJECT_TO_IDX for c in COLOR_TO_IDX for s in STATE_TO_IDX} <= vocab
    assert {"unseen", "empty", "grey-wall", "yellow-key", "yellow-door-locked", "green-goal", "red-lava"} <= vocab
    assert set(minigrid_world.HEADING_NAMES) <= vocab


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
                assert words[49] in minigrid_world.HEADING_NAMES and " ".join(words[50:]) == env.unwrapped.missions()[0]
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
        into = minigrid_world.room_step(env.fixed, p["state_flawed"], p["action"]).pos
        assert env.fixed.get(into) != "lava", p["note"]


@needs_minigrid
def test_pair_diagnostics_reads_the_twin_pairs():
    env_id = "grpo_cls/MiniGrid-DoorKey-5x5-v0"
    tok = g.Tokenizer(gym.make(env_id))
    pairs = gym.make(env_id).unwrapped.twin_pairs(8, seed=1)
    torch.manual_seed(0)
    policy = g.Policy(len(tok.words), tok.seq_len, tok.action_tokens, 16, 1, 2, with_classifier=False)
    row = g.pair_diagnostics(policy, tok, pairs, torch.device("cpu"), with_grads=True)
    assert len(row["pair_flawed_probs"]) == len(row["pair_grad_cos"]) == 8
    assert all(0 < v < 1 for v in row["pair_good_probs"] + row["pair_flawed_probs"])


# ---------------------------------------------------------------------------------------------
# MiniGrid is optional
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [envs, minigrid_world])
def test_envs_and_the_adapter_import_minigrid_only_inside_functions(module):
    """envs.py registers the rooms by a string entry point and never imports the adapter; the adapter imports
    MiniGrid only when a room is made."""
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n and (n.startswith("minigrid") or n.startswith("worlds"))]


def test_without_minigrid_envs_imports_and_a_minigrid_room_says_pip_install_minigrid():
    code = ("import sys; sys.modules['minigrid'] = None\n"  # what an environment without minigrid sees
            "import gymnasium as gym, envs\n"
            "try:\n    gym.make('grpo_cls/MiniGrid-LavaGapS5-v0')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=pathlib.Path(envs.__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("pip install minigrid") and len(out.stdout.strip().splitlines()) == 1


@needs_minigrid
def test_a_minigrid_room_trains_end_to_end_with_the_oracle_classifier_and_its_twin_pairs(tmp_path):
    """--env MiniGrid-LavaGapS5-v0 names the room with an oracle: a short run trains the classifier on the
    oracle's labels, logs the flawed rate, the held-out room and the sampled twin pairs."""
    cfg = tiny(out=str(tmp_path), env="MiniGrid-LavaGapS5-v0", cls_weight=0.5, quiet=True, iters=3, eval_every=3,
               diag_every=1)
    assert cfg.env == "grpo_cls/MiniGrid-LavaGapS5-v0"
    g.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["train_flawed_rate"] is not None and r["cls_oracle_acc"] == r["cls_acc"] for r in rows[1:])
    assert rows[-1]["ood_success_rate"] is not None and rows[-1]["flawed_rate"] is not None
    # the rooms have no hand-built probes, yet their sampled pairs are read every diag_every iterations
    assert [len(r["pair_flawed_probs"] or []) for r in rows] == [4, 4, 4, 4]  # tiny()'s four pairs


@needs_minigrid
def test_any_other_minigrid_env_is_made_in_words_with_an_oracle_and_no_held_out_family():
    cfg = tiny(out="unused", env="MiniGrid-Empty-8x8-v0")
    assert cfg.env == "grpo_cls/MiniGrid-Empty-8x8-v0"
    env = g.make_envs(cfg, 1)[0]
    _, info = env.reset(seed=0, options={"task": 3})
    assert isinstance(env.unwrapped, minigrid_world.OracleMiniGrid) and "flawed" in env.step(env.unwrapped.optimal_action())[4]
    assert g.make_envs(cfg, 1, split="heldout") == []
    assert len(g.make_envs(tiny(out="unused", env="MiniGrid-LavaGapS5-v0"), 1, split="heldout")) == 1


# ---------------------------------------------------------------------------------------------
# TextWorld games, played from the stored tables (textworld itself is needed only to build and check them:
# worlds/test_textworld_live.py, make test-textworld)
# ---------------------------------------------------------------------------------------------

TW = "grpo_cls/TextWorld-Small-v0"


@pytest.fixture(scope="module")
def tw_family():
    return {split: gym.make(TW, split=split).unwrapped for split in ("train", "heldout")}


def test_each_stored_table_names_the_tw_make_command_and_textworld_that_made_it():
    """A table is JSON (no code runs to load it), one per game, and says how its game was generated: the
    held-out games have a third room, so no held-out layout is one the training family shows."""
    for split, rooms, seeds in (("train", "2", range(1, 17)), ("heldout", "3", range(101, 109))):
        tables = textworld_world.load_tables(textworld_world.TABLES, split)
        assert len(tables) == len(seeds)
        for t, seed in zip(tables, seeds):
            made = t["made_by"]
            assert made[:2] == ["tw-make", "custom"] and made[made.index("--seed") + 1] == str(seed)
            assert made[made.index("--world-size") + 1] == rooms and "--only-last-action" in made
            assert t["textworld"] == "1.7.0" and t["game"] == f"{split}-{seed}.z8"
            assert all(len(s["next"]) == len(s["feedback"]) == len(t["commands"]) for s in t["states"])


def forward_distance(table: dict, start: int) -> int:
    """Brute force: the fewest moves from `start` to a won state, searching forward over the table."""
    frontier, seen, d = {start}, {start}, 0
    while frontier:
        if any(table["states"][i]["won"] for i in frontier):
            return d
        frontier = {j for i in frontier for j in table["states"][i]["next"] if j is not None} - seen
        seen |= frontier
        d += 1
    return envs.UNREACHABLE


def test_the_oracle_flags_exactly_the_commands_that_are_not_the_first_step_of_a_shortest_winning_plan(tw_family):
    """Against a forward search from every state of two games (the env's distances run backwards)."""
    env = tw_family["train"]
    for task in (0, 9):
        env.reset(options={"task": task})
        dist = [forward_distance(env.table, i) for i in range(len(env.table["states"]))]
        assert [env.steps_to_go(i) for i in range(len(dist))] == dist
        for i in range(len(dist)):
            flawed = env.flawed_actions(i)
            for a in range(len(env.action_names)):
                assert flawed[a] == (dist[env.next_state(i, a)] != dist[i] - 1)


def test_the_scripted_policy_wins_every_game_of_both_families_along_a_shortest_plan(tw_family):
    for env in tw_family.values():
        for task in range(len(env.games)):
            _, info = env.reset(options={"task": task})
            plan, steps, done = env.steps_to_go(), 0, False
            assert 1 <= plan <= env.max_steps
            while not done:
                a = env.optimal_action()
                assert info["action_mask"][a] == 1
                _, reward, done, truncated, info = env.step(a)
                steps += 1
                assert not info["flawed"] and not truncated
            assert info["success"] and reward == 1.0 and steps == plan


def test_a_command_outside_the_games_table_leaves_the_state_reads_nothing_and_is_flawed(tw_family):
    env = tw_family["train"]
    obs, _ = env.reset(options={"task": 0})
    other = next(a for a, c in enumerate(env.action_names) if c not in env.table["commands"])
    state = env.state
    obs2, reward, done, truncated, info = env.step(other)
    assert env.state == state and info["flawed"] and reward == 0.0 and not done
    assert obs2 == textworld_world.observation(env.table, state, "") and info["action_mask"][other] == 0


def tiny_tables(folder) -> str:
    """A made-up family in the stored format: one training game with a losing and a winning command, one
    held-out game; a user's own tables load the same way (--env-kwargs '{"tables": ...}')."""
    def state(room, won=False, lost=False, nxt=(None, None), fb=(None, None), admissible=(0, 1)):
        return {"key": room, "room": room, "inventory": "nothing", "won": won, "lost": lost,
                "admissible": [] if won or lost else list(admissible), "next": list(nxt), "feedback": list(fb)}
    game = {"game": "train-1.z8", "made_by": None, "textworld": "1.7.0", "task": "take key", "also": [],
            "commands": ["take key", "eat key"], "feedbacks": ["take key", "eat key"],
            "states": [state("hall", nxt=(1, 2), fb=(0, 1)), state("hall won", won=True), state("hall lost", lost=True)]}
    for name in ("train-1", "heldout-1"):
        (folder / f"{name}.json").write_text(json.dumps(game | {"game": f"{name}.z8"}))
    return str(folder)


def test_a_lost_state_ends_the_episode_unsuccessful_and_its_command_is_flawed(tmp_path):
    env = gym.make(TW, tables=tiny_tables(tmp_path)).unwrapped
    assert env.action_names == ["eat key", "take key"]
    env.reset(options={"task": 0})
    assert env.optimal_action() == 1 and env.steps_to_go() == 1
    obs, reward, terminated, truncated, info = env.step(0)
    assert terminated and not truncated and not info["success"] and info["flawed"] and reward == 0.0
    assert obs == "task : take key . eat key . hall lost . inventory : nothing"
    env.reset(options={"task": 0})
    assert env.step(1)[1:3] == (1.0, True)


def test_observations_are_short_declared_words_and_share_one_action_set_across_the_families(tw_family):
    train, heldout = tw_family["train"], tw_family["heldout"]
    assert train.action_names == heldout.action_names and train.vocab == heldout.vocab
    assert train.max_words <= 64  # the most an observation has: 64 words (train), 53 (held-out)
    tok = g.Tokenizer(gym.make(TW))
    rng = np.random.default_rng(0)
    for env in (train, heldout):
        for task in range(len(env.games)):
            obs, info = env.reset(options={"task": task})
            for _ in range(env.max_steps):
                assert obs.startswith("task : ") and " . inventory : " in obs
                assert len(tok.encode(obs)) == 1 + train.max_words  # encodes: every word declared, none too many
                obs, _, done, trunc, info = env.step(int(rng.choice(np.flatnonzero(info["action_mask"]))))
                if done or trunc:
                    break
    only_heldout = {w for t in heldout.games for c in t["commands"] for w in c.split()} - \
        {w for t in train.games for c in t["commands"] for w in c.split()}
    assert only_heldout and only_heldout <= set(tok.words)  # words no training game shows still have tokens


def test_the_twin_pairs_are_distinct_state_pairs_a_few_words_apart_with_a_command_that_flips(tw_family):
    """At every state that reads as the good twin the command is good, and flawed at every one that reads as
    the flawed twin; no two pairs share their states and command; the held-out env draws the same pairs."""
    env = tw_family["train"]
    pairs = env.twin_pairs(48, seed=3)
    assert [p["note"] for p in pairs] == [q["note"] for q in tw_family["heldout"].twin_pairs(48, seed=3)]
    keys = {(p["task_good"], p["state_good"], p["task_flawed"], p["state_flawed"], p["action"]) for p in pairs}
    assert len(keys) == len(pairs)
    shown = collections.defaultdict(list)  # observation -> every (task, state) that shows it
    for task, table in enumerate(env.games):
        for i, row in enumerate(table["states"]):
            for j, f in zip(row["next"], row["feedback"]):
                if j is not None:
                    shown[textworld_world.observation(table, j, table["feedbacks"][f])].append((task, j))
            if i == 0:
                shown[textworld_world.observation(table, 0, "")].append((task, 0))
    for p in pairs:
        a, good, bad = p["action"], p["obs_good"].split(), p["obs_flawed"].split()
        assert len(good) == len(bad) and 1 <= sum(x != y for x, y in zip(good, bad)) == p["words_apart"] <= 4
        assert p["mask_good"][a] == p["mask_flawed"][a] == 1 and p["flawed_at_twin"][a]
        for obs, flawed in ((p["obs_good"], False), (p["obs_flawed"], True)):
            for task, state in set(shown[obs]):
                env.reset(options={"task": task})
                assert env.mask(state)[a] == 1 and env.is_flawed(state, a) == flawed


def test_the_textworld_env_passes_gymnasiums_checker_on_both_splits():
    for split in ("train", "heldout"):
        check_env(gym.make(TW, split=split).unwrapped, skip_render_check=True)


def test_textworld_small_trains_end_to_end_with_the_oracle_classifier_and_its_twin_pairs(tmp_path):
    cfg = tiny(out=str(tmp_path), env="TextWorld-Small-v0", cls_weight=0.5, quiet=True, iters=3, eval_every=3,
               diag_every=1)
    assert cfg.env == TW
    g.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["train_flawed_rate"] is not None and r["cls_oracle_acc"] == r["cls_acc"] for r in rows[1:])
    assert rows[-1]["ood_success_rate"] is not None and rows[-1]["flawed_rate"] is not None
    assert [len(r["pair_flawed_probs"] or []) for r in rows] == [4, 4, 4, 4]


@pytest.mark.parametrize("module", ["worlds/textworld.py", "worlds/textworld_tables.py", "envs.py", "grpo_cls.py"])
def test_only_the_table_builder_imports_textworld_and_only_inside_a_function(module):
    tree = ast.parse(open(os.path.join(HERE, module)).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("textworld", "jericho")]
    inner = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert ("textworld" in inner) == (module == "worlds/textworld_tables.py")


def test_without_textworld_the_games_are_made_and_played_from_the_stored_tables():
    code = ("import sys; sys.modules['textworld'] = None; sys.modules['jericho'] = None\n"  # as if not installed
            "import gymnasium as gym, envs\n"
            "env = gym.make('grpo_cls/TextWorld-Small-v0').unwrapped\n"
            "env.reset(options={'task': 0})\n"
            "while not env.step(env.optimal_action())[2]:\n    pass\n"
            "print(env.table['states'][env.state]['won'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-500:]


def test_without_textworld_the_table_builder_says_how_to_install_it_in_one_line():
    code = ("import sys, runpy; sys.modules['textworld'] = None\n"
            "runpy.run_module('worlds.textworld_tables', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 1 and out.stdout == ""
    assert "pip install textworld==1.7.0" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The bridge to TRL and verl is optional (its own tests: make test-bridge)
# ---------------------------------------------------------------------------------------------

def test_nothing_outside_bridge_imports_it_or_the_engines():
    """grpo_cls.py, envs.py, the adapters and the studies import neither bridge/ nor trl, transformers or verl."""
    files = ["grpo_cls.py", "envs.py"] + sorted(f"{d}/{f}" for d in ("studies", "worlds")
                                                for f in os.listdir(os.path.join(HERE, d)) if f.endswith(".py"))
    found = []
    for f in files:
        for node in ast.walk(ast.parse(open(os.path.join(HERE, f)).read())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [(f, n) for n in names if n.split(".")[0] in ("bridge", "trl", "transformers", "verl")]
    assert found == []


def test_without_trl_the_bridge_example_says_make_bridge_in_one_line():
    code = ("import sys, runpy; sys.modules['trl'] = None\n"  # what an environment without trl sees
            "runpy.run_module('bridge.example', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("python -m bridge.example: trl is not installed; `make bridge` installs")
    assert len(out.stderr.strip().splitlines()) == 1

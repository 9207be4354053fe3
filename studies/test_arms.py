"""The lab's arms (studies/arms.py): each arm's label source, channel, shaping, design and advantage does
what it says; with every arm off the lab trains bit for bit as grpo_cls.py does; the update's shadow
statistics. Run: make test (or python -m pytest studies/)."""

import dataclasses
import functools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import grpo_cls as g
from studies import arms, store

torch.set_num_threads(1)


def tiny(**kw):
    """A tiny arm config: the tests' runs take seconds."""
    base = dict(env="text", iters=2, tasks_per_iter=2, num_generations=2, eval_tasks=4, eval_every=1,
                sft_steps=2, threads=1, d_model=32, out="", twin_pairs=4)
    return arms.ArmConfig(**(base | kw))


MEASURED = ("wall_s", "rss_mib", "peak_rss_mib", "time_rollout_s", "time_update_s", "time_eval_s", "time_diag_s")


def metrics(run_dir: str) -> list[dict]:
    """Every metric but the clock and memory readings, which no run can repeat."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


# ---------------------------------------------------------------------------------------------
# With every arm off, the lab is grpo_cls.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(cls_weight=0.5),
                                dict(cls_weight=0.5, cls_labels="advantage", beta=0.05, num_iterations=2)])
def test_with_every_arm_off_the_lab_trains_bit_for_bit_as_grpo_cls(tmp_path, kw):
    """The lab repeats grpo_cls.py's update and loop with the arms in them. Off, they must train exactly as
    the method does, over several minibatches an iteration with the classifier's share split among them:
    every field grpo_cls.py logs is equal, the parameters too, and the lab logs its own fields besides."""
    fields = dict(env="grid", iters=3, tasks_per_iter=8, num_generations=8, sft_steps=0, minibatch_size=16,
                  eval_tasks=8, eval_every=2, threads=1, d_model=32, twin_pairs=4, quiet=True, no_plots=True,
                  baseline="none") | kw
    g.train(g.Config(**fields, out=str(tmp_path / "core")))
    arms.train(arms.ArmConfig(**fields, out=str(tmp_path / "lab")))
    core, lab = metrics(tmp_path / "core"), metrics(tmp_path / "lab")
    assert all(r["opt_steps"] >= 2 for r in core[1:])  # several minibatches: their order is compared too
    assert [{k: r[k] for k in c} for c, r in zip(core, lab, strict=True)] == core
    assert set(lab[-1]) - set(core[-1]) == set(arms.ROW_KEYS) - set(g.ROW_KEYS)
    core_params, lab_params = (g.load_checkpoint(str(tmp_path / d))["model"] for d in ("core", "lab"))
    assert core_params.keys() == lab_params.keys()
    assert all(torch.equal(core_params[k], lab_params[k]) for k in core_params)


@pytest.mark.parametrize("arm", [dict(), dict(cls_channel="placebo"), dict(cls_design="separate")])
def test_a_lab_classifier_run_is_set_beside_the_stored_plain_run(tmp_path, arm):
    """A lab run with a classifier finishes with the summary grpo_cls.py writes, and is set beside a stored
    plain run that is its config but for the classifier (its channel and design included)."""
    fields = dict(env="text", iters=2, tasks_per_iter=2, num_generations=2, eval_tasks=4, eval_every=2,
                  sft_steps=2, threads=1, d_model=32, twin_pairs=0, quiet=True, no_plots=True)
    arms.train(arms.ArmConfig(**fields, baseline="none", out=str(tmp_path / "plain")))
    s = arms.train(arms.ArmConfig(**fields, cls_weight=0.5, baseline=str(tmp_path / "plain"),
                                  out=str(tmp_path / "cls"), **arm))
    assert s["baseline"] == str(tmp_path / "plain") and s["baseline_flawed_rate"] is not None
    assert json.load(open(tmp_path / "cls" / "summary.json"))["baseline_success_rate"] is not None
    assert arms.train(arms.ArmConfig(**fields, cls_weight=0.5, baseline="auto", out=str(tmp_path / "auto"), **arm))


def test_every_stored_run_config_loads_into_the_lab_config_with_no_field_left_over():
    """Every config.json under results/ (the stored runs, the reference) is an ArmConfig's fields plus what the
    run folder records about its machine: no field a run stored is dropped in silence."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fields = {f.name for f in dataclasses.fields(arms.ArmConfig)}
    machine = {"torch", "numpy", "gymnasium", "device", "threads", "update"}
    paths = [os.path.join(d, "config.json") for d, _, files in os.walk(os.path.join(root, "results"))
             if "config.json" in files]
    assert len(paths) > 100
    for path in paths:
        saved = json.load(open(path))
        assert set(saved) <= fields | machine, (path, set(saved) - fields - machine)
        assert arms.ArmConfig(**{k: v for k, v in saved.items() if k in fields} | {"out": "unused"})


def test_the_lab_flag_table_matches_the_arms_config():
    """docs/flags.md's table of the lab's flags has a row for each field the arms add, with its default and help."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")).read()
    table = readme.split("| lab flag |")[1].split("\n\n")[0]
    core = {f.name for f in dataclasses.fields(g.Config)}
    for f in dataclasses.fields(arms.ArmConfig):
        if f.name not in core or f.name == "cls_labels":
            row = f"| `--{f.name.replace('_', '-')}` | {f.default} | {f.metadata['help']}"
            assert row in table, row


def test_pretraining_moves_the_trunk_lowers_its_own_loss_and_leaves_the_runs_random_streams_alone():
    """--pretrain mlm changes only the weights the cold start starts from: the run's generators are where they
    were, so the cold start after it draws exactly what it would draw without it."""
    cfg = arms.ArmConfig(env="text", seed=1, out="unused", threads=1, tasks_per_iter=2, num_generations=4,
                         pretrain="mlm")
    device, tok, policy, gen, rng = arms.build(cfg)
    envs_ = g.make_envs(cfg, 8)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    gen_state, rng_state, global_state = gen.get_state(), rng.bit_generator.state, torch.get_rng_state()
    losses = arms.pretrain_trunk(policy, cfg, tok, envs_, device, "mlm", steps=60)
    assert torch.equal(torch.get_rng_state(), global_state)  # nor the global stream a classifier head moves
    assert np.mean(losses[-15:]) < np.mean(losses[:15])
    assert not torch.equal(before["tok_emb.weight"], policy.state_dict()["tok_emb.weight"])
    assert torch.equal(before["policy_head.weight"], policy.state_dict()["policy_head.weight"])  # no head of ours
    assert torch.equal(gen.get_state(), gen_state) and rng.bit_generator.state == rng_state


def test_the_lab_fields_grpo_cls_refuses_are_every_arm_at_its_default():
    """grpo_cls.py refuses a stored run with an arm on: its list must name every field the lab adds, at the
    value ArmConfig gives it, but for the arms' own parameters (which do nothing while their arm is off)."""
    parameters = {"omega", "gamma", "shaping_lambda"}  # of gigpo (and the step labels), and of shaping
    lab_only = {f.name for f in dataclasses.fields(arms.ArmConfig)} - {f.name for f in dataclasses.fields(g.Config)}
    assert set(g.LAB_FIELDS_OFF) == lab_only - parameters
    defaults = arms.ArmConfig(out="unused")
    assert g.LAB_FIELDS_OFF == {k: getattr(defaults, k) for k in g.LAB_FIELDS_OFF}


@pytest.mark.parametrize("arm", [["--cls-channel", "placebo"], ["--cls-design", "separate", "--cls-labels", "loop"],
                                 ["--cls-weight", "0", "--shaping", "loop", "--adv", "gigpo"]])
def test_a_lab_run_resumed_is_the_run_that_never_stopped(tmp_path, arm):
    """The placebo's own generator, the separate classifier's parameters and the arms' config all travel in
    the checkpoint: stopped after 2 of 4 iterations and resumed, a lab run is the run that never stopped."""
    args = ["--iters", "4", "--tasks-per-iter", "8", "--num-generations", "8", "--env", "grid", "--sft-steps", "0",
            "--eval-tasks", "4", "--eval-every", "2", "--twin-pairs", "4", "--threads", "1", "--quiet", "--no-plots",
            "--baseline", "none", "--anneal-lr", "0", "--cls-weight", "0.5"] + arm
    arms.main(args + ["--out", str(tmp_path / "straight")])
    arms.main(args + ["--iters", "2", "--out", str(tmp_path / "split")])
    arms.main(["--resume", str(tmp_path / "split"), "--iters", "4", "--quiet"])
    rows = metrics(tmp_path / "straight")
    assert metrics(tmp_path / "split") == rows and any(r["opt_steps"] for r in rows[3:])


@pytest.mark.parametrize("arm", [["--cls-channel", "placebo"], ["--cls-channel", "policy"], ["--cls-design", "separate"],
                                 ["--cls-labels", "loop"], ["--cls-labels", "step"], ["--adv", "gigpo"],
                                 ["--cls-weight", "0", "--shaping", "oracle"]])
def test_grpo_cls_refuses_to_resume_a_lab_run_with_an_arm_on(tmp_path, capsys, arm):
    out = str(tmp_path / "run")
    arms.main(["--iters", "1", "--tasks-per-iter", "2", "--num-generations", "2", "--eval-tasks", "2",
               "--sft-steps", "1", "--d-model", "16", "--threads", "1", "--twin-pairs", "0", "--quiet", "--no-plots",
               "--baseline", "none", "--cls-weight", "0.5", *arm, "--out", out])
    with pytest.raises(SystemExit) as stop:
        g.main(["--resume", out, "--iters", "1"])
    assert stop.value.code == 2 and "python -m studies.arms --resume" in capsys.readouterr().err


@pytest.mark.parametrize("arm", [["--cls-placement", "low"], ["--cls-channel", "repel"], ["--pretrain", "mlm"]])
def test_the_mechanism_arms_train_end_to_end_and_resume(tmp_path, monkeypatch, arm):
    """Each arm of the mechanism matrix, on a tiny Kitchen run stopped after one iteration and resumed: the
    resumed run equals the straight one (placement reads its stored split, repel rebuilds its pairs)."""
    for name, value in (("REPEL_PAIRS", 16), ("PRETRAIN_STEPS", 5)):
        monkeypatch.setattr(arms, name, value)
    args = ["--tasks-per-iter", "8", "--num-generations", "4", "--eval-tasks", "4", "--sft-steps", "20",
            "--d-model", "32", "--threads", "1", "--twin-pairs", "4", "--quiet", "--no-plots", "--baseline", "none",
            "--anneal-lr", "0", "--eval-every", "2", "--cls-weight", "0.5", *arm]
    arms.main(args + ["--iters", "4", "--out", str(tmp_path / "straight")])
    arms.main(args + ["--iters", "2", "--out", str(tmp_path / "split")])
    arms.main(["--resume", str(tmp_path / "split"), "--iters", "4", "--quiet"])
    rows = [rows_without_clocks(tmp_path / name) for name in ("straight", "split")]
    assert rows[0] == rows[1] and len(rows[0]) == 5
    if "--cls-placement" in arm:  # labels placed, never more than the cap or than the other half offers
        steps = np.diff([r["env_steps"] for r in rows[0]])
        for r, n in zip(rows[0][1:], steps):
            assert r["placed_labels"] == round(r["cls_labelled_frac"] * n)
            assert r["placed_labels"] == min(arms.PLACEMENT_CAP, r["placement_eligible"], r["placement_eligible_other"])
        assert sum(r["placed_labels"] for r in rows[0][1:]) > 0
        assert (tmp_path / "split" / "placement.json").exists()


def rows_without_clocks(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "wall", "rss", "peak"))} for r in rows]


def test_step_labels_compare_each_action_with_its_anchor_states_mean_return():
    # two groups of G = 2; state "s" recurs in group 0 (trajectories 0 and 1), "t" only once
    traj = np.array([0, 0, 1, 1, 2, 3])
    keys = ["s", "u", "s", "u", "t", "v"]
    rtg = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    y, labelled = arms.step_labels(traj, keys, rtg, G=2)
    assert labelled.tolist() == [True, False, True, False, False, False]  # "u" ties, "t" and "v" are alone
    assert y.tolist()[:3] == [0.0, 0.0, 1.0]                              # rtg 1 > 0.5 good; 0 < 0.5 bad
    # the same state in two different groups is not an anchor
    y, labelled = arms.step_labels(np.array([0, 2]), ["s", "s"], np.array([1.0, 0.0]), G=2)
    assert not labelled.any()


def test_returns_to_go_sum_rewards_to_the_end_of_each_trajectory():
    traj = np.array([0, 0, 0, 1, 1])
    assert arms.returns_to_go(traj, np.array([0.0, 1.0, 2.0, 5.0, 0.0])).tolist() == [3.0, 3.0, 2.0, 5.0, 0.0]


def test_step_labels_train_end_to_end(tmp_path):
    # LavaGrid from scratch succeeds ~10% of the time, so some groups disagree about their shared start state
    s = arms.train(tiny(env="grid", out=str(tmp_path / "run"), cls_weight=0.5, cls_labels="step", tasks_per_iter=8,
                     num_generations=4, iters=3, sft_steps=0, quiet=True))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][1:]
    assert s["iters"] == 3 and all(0 < r["cls_labelled_frac"] < 1 for r in rows)  # the anchors label some steps
    assert all(r["cls_loss"] > 0 and r["cls_acc"] is not None for r in rows)


def test_returns_to_go_discount_each_later_reward_by_gamma():
    traj = np.array([0, 0, 0, 1])
    rtg = arms.returns_to_go(traj, np.array([0.0, 0.0, 1.0, 1.0]), gamma=0.5)
    assert rtg.tolist() == [0.25, 0.5, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# GiGPO's step-level advantage and the separate-path classifier
# ---------------------------------------------------------------------------------------------

def test_anchor_advantages_standardise_returns_within_each_anchor_and_leave_lone_states_at_zero():
    # group 0 = trajectories 0, 1 (G = 2): "s" is shared by three steps; "u" and "v" are alone
    traj = np.array([0, 0, 1, 1, 2])
    keys = ["s", "u", "s", "s", "s"]  # trajectory 2 is in group 1: its "s" is another anchor, of one step
    rtg = np.array([1.0, 5.0, 0.0, 0.5, 3.0])
    A_S = arms.anchor_advantages(traj, keys, rtg, G=2, scale="group")
    v = np.array([1.0, 0.0, 0.5])
    expected = (v - v.mean()) / (v.std(ddof=1) + 1e-4)
    assert np.allclose(A_S[[0, 2, 3]], expected) and A_S[1] == 0 and A_S[4] == 0
    assert np.allclose(arms.anchor_advantages(traj, keys, rtg, G=2, scale="none")[[0, 2, 3]], v - v.mean())


def test_gigpo_adds_omega_times_the_step_advantage_to_the_trajectory_advantage():
    cfg = tiny(out="unused", adv="gigpo", omega=0.5, gamma=1.0)
    batch = {"traj": np.array([0, 0, 1]), "step_reward": np.array([0.0, 1.0, 0.0]),
             "tokens": np.array([[1, 2], [1, 3], [1, 2]])}  # steps 0 and 2 share an observation
    A_traj = torch.tensor([1.0, -1.0])
    A = arms.step_advantages(cfg, batch, A_traj, torch.device("cpu"))
    A_S = (1.0 - 0.5) / (np.std([1.0, 0.0], ddof=1) + 1e-4)  # rtg 1 and 0 at the shared state
    assert torch.allclose(A, torch.tensor([1.0 + 0.5 * A_S, 1.0, -1.0 - 0.5 * A_S], dtype=A.dtype))
    plain = arms.step_advantages(tiny(out="unused"), batch, A_traj, torch.device("cpu"))
    assert plain.tolist() == [1.0, 1.0, -1.0]


def test_separate_classifier_reads_the_action_as_a_token_and_leaves_the_pair_mlp_and_policy_head_alone():
    """The separate verdict runs the trunk again with the action as an input token. Its gradient reaches
    the trunk and the embeddings that phi also reads (tok_emb, act_emb), but never the pair MLP or the
    policy head: phi is shaped only through what it shares with the trunk."""
    policy = arms.build(tiny(out="unused", cls_weight=0.5, cls_design="separate"))[2]
    x = torch.randint(2, 20, (3, policy.pos_emb.num_embeddings))
    x[:, 0] = 1
    c0, c1 = policy.classify_separately(x, torch.tensor([0, 0, 0])), policy.classify_separately(x, torch.tensor([1, 1, 1]))
    assert c0.shape == (3,) and not torch.allclose(c0, c1)  # the verdict depends on the action
    assert policy(x, torch.ones(3, policy.act_emb.num_embeddings, dtype=torch.bool))[2] is None
    c0.sum().backward()
    for name in ("pair_s", "pair_a", "pair_m", "policy_head"):  # phi and the policy logit get no gradient
        assert all(p.grad is None for p in getattr(policy, name).parameters()), name
    for name in ("tok_emb", "act_emb"):  # what phi reads too: the separate design is not independent of phi
        assert getattr(policy, name).weight.grad.abs().sum() > 0, name
    assert policy.blocks[0].qkv.weight.grad.abs().sum() > 0  # and the shared trunk


# ---------------------------------------------------------------------------------------------
# The fair update: an arm changes only the term it adds, and that term does its job
# ---------------------------------------------------------------------------------------------

POLICY_METRICS = ("train_success_rate", "train_flawed_rate", "success_rate", "ood_success_rate", "flawed_rate",
                  "ood_flawed_rate", "probe_flawed_probs", "probe_control_probs", "grad_cos_twin_each",
                  "embed_cos_good_bad", "probe_action_probs", "adv_flawed_mean", "adv_good_mean", "zero_std_frac",
                  "pg_loss", "entropy", "clip_frac", "eval_return", "update_samples", "opt_steps", "env_steps")


def train_from(init: str, cfg):
    """Train cfg from the iteration-0 checkpoint in `init`; returns (policy parameters, metric rows)."""
    arms.train(cfg, store.from_cold_start(g.load_checkpoint(init), cfg))
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    return g.load_checkpoint(cfg.out)["model"], rows


FAIR = dict(env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, iters=3, quiet=True)  # groups differ


@pytest.fixture(scope="module")
def fair_plain(tmp_path_factory):
    """A shared cold start of the FAIR config and plain GRPO trained from it, made once for every arm."""
    root = tmp_path_factory.mktemp("fair")
    store.cold_start_checkpoint(tiny(out=str(root / "init"), **FAIR))
    return (str(root / "init"), *train_from(str(root / "init"), tiny(out=str(root / "plain"), **FAIR)))


@pytest.mark.parametrize("arm", [{"cls_labels": "advantage"}, {"cls_labels": "oracle"}, {"cls_labels": "step"},
                                 {"cls_labels": "loop"}, {"cls_labels": "oracle", "cls_design": "separate"},
                                 {"cls_labels": "oracle", "cls_channel": "placebo"},
                                 {"cls_labels": "oracle", "cls_channel": "policy"}])
def test_fair_update_a_classifier_weighted_zero_trains_the_policy_bit_for_bit_as_plain_grpo(tmp_path, monkeypatch,
                                                                                            arm, fair_plain):
    """The classifier (or the placebo, or the labels' policy term) is built, labelled and in the loss, but
    its term is multiplied by 0: the policy's parameters and every policy metric must then equal plain
    GRPO's exactly. A sample rule, a mean or a step count that depended on the labels would break it (the
    arm would see other minibatches)."""
    init, plain_params, plain_rows = fair_plain
    real, real_policy = g.classification_loss, arms.labels_through_policy
    monkeypatch.setattr(g, "classification_loss", lambda c, y, labelled: 0.0 * real(c, y, labelled))
    monkeypatch.setattr(arms, "labels_through_policy", lambda *args: 0.0 * real_policy(*args))
    arm_cfg = tiny(out=str(tmp_path / "arm"), cls_weight=0.5, **FAIR, **arm)
    arm_params, arm_rows = train_from(init, arm_cfg)
    for name, value in plain_params.items():
        assert torch.equal(arm_params[name], value), name
    for p_row, a_row in zip(plain_rows, arm_rows, strict=True):
        assert {k: p_row[k] for k in POLICY_METRICS} == {k: a_row[k] for k in POLICY_METRICS}
    assert all(r["cls_labelled_frac"] > 0 for r in arm_rows[1:])  # the classifier was labelled, and in the loss
    assert all(r["adam_pg_step_scale"] == pytest.approx(1.0, abs=1e-6) for r in arm_rows[1:])  # Adam's v: pg's alone
    assert max(r["opt_steps"] for r in arm_rows[1:]) >= 2  # several minibatches: their order is checked too


def test_fair_update_the_repel_arm_weighted_zero_trains_the_policy_bit_for_bit_as_plain_grpo(tmp_path, monkeypatch,
                                                                                           fair_plain):
    """--cls-channel repel's term, multiplied by 0: the twin pairs are shared out over the optimizer steps and
    forwarded, yet the policy and every policy metric equal plain GRPO's exactly."""
    init, plain_params, plain_rows = fair_plain
    real = arms.twin_repulsion
    monkeypatch.setattr(arms, "twin_repulsion", lambda *args: 0.0 * real(*args))
    arm_params, arm_rows = train_from(init, tiny(out=str(tmp_path / "arm"), cls_weight=0.5, cls_channel="repel",
                                                 **FAIR))
    for name, value in plain_params.items():
        assert torch.equal(arm_params[name], value), name
    for p_row, a_row in zip(plain_rows, arm_rows, strict=True):
        assert {k: p_row[k] for k in POLICY_METRICS} == {k: a_row[k] for k in POLICY_METRICS}
    assert all(r["cls_loss"] == 0 and r["cls_acc"] is None and r["cls_labelled_frac"] is None
               for r in arm_rows[1:] if r["opt_steps"])


def test_the_repel_term_is_the_mean_twin_cosine_over_its_share_and_its_step_lowers_it():
    """repel_stream on a share of 40 training pairs in pieces of 16 (the last padded): its term equals the
    mean cosine of phi(s_good, a), phi(s_flawed, a) computed in one pass, and a small step against its
    gradient lowers that cosine."""
    cfg = tiny(out="unused", env="text", cls_weight=1.0, cls_channel="repel", minibatch_size=32, sft_steps=150,
               d_model=64)  # a smaller or shorter cold start leaves the twins at cosine 1, where the term is flat
    device, tok, policy, gen, rng = arms.build(cfg)
    envs_ = g.make_envs(cfg, 16)
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)  # at initialisation every twin cosine is 1
    pairs = arms.repel_pairs(cfg, tok, envs_[0], device)
    jdx = torch.arange(40)

    def mean_cos():  # of the twins' pair embeddings without their components along the policy head w
        phi = policy(pairs["x"][jdx].flatten(0, 1), pairs["m"][jdx].flatten(0, 1))[1]
        phi = phi.view(40, 2, *phi.shape[1:])[torch.arange(40), :, pairs["a"][jdx]]               # (40, 2, d)
        w = F.normalize(policy.policy_head.weight.detach()[0], dim=0)
        phi = phi - (phi @ w)[..., None] * w
        return F.cosine_similarity(phi[:, 0], phi[:, 1], dim=-1).mean()
    params = list(policy.parameters())
    c, term, grads = arms.repel_stream(policy, cfg, pairs, jdx, params)
    before = mean_cos()
    assert c is None and term.item() == pytest.approx(before.item(), abs=1e-6)
    names = [n for n, _ in policy.named_parameters()]
    assert grads[names.index("policy_head.weight")] is None  # the term never trains w
    with torch.no_grad():
        for p, grad in zip(params, grads):
            if grad is not None:
                p -= 0.05 * grad
    assert mean_cos() < before


def test_placed_labels_keep_only_labelled_steps_at_the_chosen_twins_and_at_most_the_cap():
    tokens = np.array([[1, 2, i % 5] for i in range(100)])  # five distinct observations, 20 steps each
    batch = {"tokens": tokens}
    keys = {tokens[0].tobytes(), tokens[1].tobytes()}  # observations 0 and 1: 40 steps
    y, labelled = torch.rand(100), torch.arange(100) % 4 != 3  # every fourth step unlabelled
    other = {tokens[2].tobytes(), tokens[3].tobytes(), tokens[4].tobytes()}  # 45 labelled steps
    gen = torch.Generator().manual_seed(0)
    (y2, placed), counts = arms.placed_labels((y, labelled), batch, (keys, other), gen, "cpu")
    eligible = [i for i in range(100) if i % 5 in (0, 1) and i % 4 != 3]
    assert y2 is y and placed.sum() == min(arms.PLACEMENT_CAP, len(eligible)) == 30
    assert counts == {"placed_labels": 30, "placement_eligible": 30, "placement_eligible_other": 45}
    assert set(torch.nonzero(placed).squeeze(1).tolist()) <= set(eligible)
    rarer = {tokens[2].tobytes()}  # the other half offers 15 in this batch: this arm keeps 15 of its 30
    (_, placed), counts = arms.placed_labels((y, labelled), batch, (keys, rarer), gen, "cpu")
    assert placed.sum() == counts["placed_labels"] == 15


def test_training_pairs_have_no_repeat_and_share_no_observation_with_the_measured_pairs():
    cfg = tiny(out="unused", twin_pairs=64)
    device, tok, policy, gen, rng = arms.build(cfg)
    env = g.make_envs(cfg, 1)[0]
    pairs = arms.training_pairs(cfg, tok, env, 512, "test")
    key = lambda p: (tok.encode(p["obs_good"]).tobytes(), tok.encode(p["obs_flawed"]).tobytes(), p["action"])  # noqa
    measured = {k for p in env.unwrapped.twin_pairs(64, seed=cfg.seed) for k in key(p)[:2]}
    assert 0 < len(pairs) < 512 and len({key(p) for p in pairs}) == len(pairs)
    assert not {k for p in pairs for k in key(p)[:2]} & measured


def test_the_placement_split_is_made_at_the_cold_start_stored_and_read_back_on_resume(tmp_path, monkeypatch):
    """placement_keys computes the split from the cold-start policy and writes placement.json; a resumed run
    reads it (even with another policy); a run that left its cold start without one is refused."""
    monkeypatch.setattr(arms, "PLACEMENT_PAIRS", 12)
    cfg = tiny(out=str(tmp_path), cls_weight=0.5, cls_placement="high", sft_steps=20)
    device, tok, policy, gen, rng = arms.build(cfg)
    env = g.make_envs(cfg, 1)[0]
    split = arms.placement_split(cfg, policy, tok, env, device)
    pairs = arms.training_pairs(cfg, tok, env, 12, "test")
    cos = g.pair_diagnostics(policy, tok, pairs, device, with_grads=True)["pair_grad_cos"]
    obs = lambda p: {tok.encode(p[k]).tobytes().hex() for k in ("obs_good", "obs_flawed")}  # noqa: E731
    high = set().union(*(obs(p) for p, c in zip(pairs, cos) if c > split["median"]))
    low = set().union(*(obs(p) for p, c in zip(pairs, cos) if c <= split["median"]))
    assert split["high"] and split["low"] and not set(split["high"]) & set(split["low"])  # disjoint halves
    assert set(split["high"]) == high - low and set(split["low"]) == low - high  # high: the larger overlaps
    keys = arms.placement_keys(cfg, policy, tok, env, device, at_cold_start=True)
    assert keys == ({bytes.fromhex(k) for k in split["high"]}, {bytes.fromhex(k) for k in split["low"]})
    assert (tmp_path / "placement.json").exists()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)  # the policy moves on; the stored split stays
    assert arms.placement_keys(cfg, policy, tok, env, device, at_cold_start=False) == keys
    (tmp_path / "placement.json").unlink()
    with pytest.raises(g.TrainingError, match="start the run anew"):
        arms.placement_keys(cfg, policy, tok, env, device, at_cold_start=False)


def random_grid_batch(cfg):
    """One rollout of a fresh policy on 8 grid tasks x 8: some groups succeed and fail, so A != 0."""
    device, tok, policy, gen, rng = arms.build(cfg)
    batch = g.rollout(policy, g.make_envs(cfg, 64), tok, np.repeat(np.arange(8), 8), np.arange(64), gen, device)
    R = torch.as_tensor(batch["reward"], dtype=torch.float32).view(8, 8)
    return batch, arms.step_advantages(cfg, batch, g.group_advantages(R).view(-1), device)


def test_each_stream_is_clipped_on_its_own_so_a_large_classifier_gradient_never_shrinks_the_policy_step():
    """One SGD step on one minibatch, plain GRPO against a classifier weighted 1000. The policy head is
    reached by the policy gradient only, so its step must be the same bit for bit: with one clip on the
    summed gradient, the classifier's norm would shrink it (the logged joint_clip_pg_scale says by how much)."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, minibatch_size=4096)
    batch, A = random_grid_batch(cfg)
    heads, stats = {}, {}
    for w in (0.0, 1000.0):
        arm = dataclasses.replace(cfg, cls_weight=w)
        device, tok, policy, gen, rng = arms.build(arm)
        before = policy.policy_head.weight.detach().clone()
        stats[w] = arms.grpo_update(policy, None, torch.optim.SGD(policy.parameters(), lr=1.0), arm, batch, A, None,
                                 gen, device)
        heads[w] = policy.policy_head.weight.detach() - before
        if w:
            cos_v_w = torch.nn.functional.cosine_similarity(policy.cls_head.weight, policy.policy_head.weight).item()
            assert stats[w]["cos_v_w"] == pytest.approx(cos_v_w, abs=1e-6)  # Adam's second moment, shared with the classifier's gradient, changes the policy gradient's step
            adam = torch.optim.Adam(policy.parameters())
            scale = arms.grpo_update(policy, None, adam, arm, batch, A, None, gen, device)["adam_pg_step_scale"]
            assert abs(scale - 1) > 0.1  # (a classifier weighted 0 leaves it at 1: the fair-update test)
    assert stats[0.0]["opt_steps"] == stats[1000.0]["opt_steps"] == 1
    assert heads[0.0].abs().sum() > 0 and torch.equal(heads[0.0], heads[1000.0])
    assert stats[0.0]["pg_grad_norm"] == stats[1000.0]["pg_grad_norm"]
    big = stats[1000.0]
    assert big["cls_grad_clipped_frac"] == 1.0 and big["cls_pg_grad_ratio"] > 1 and big["joint_clip_pg_scale"] < 1
    assert all(stats[0.0].get(k) is None for k in ("cls_grad_norm", "cls_pg_grad_ratio", "cos_v_w"))


def test_a_non_finite_classifier_gradient_is_caught_before_it_reaches_the_policy():
    """The classifier's gradient is clipped on its own, so an inf there would turn into NaN weights
    (inf * 0) without the policy-gradient norm ever seeing it: its own norm is checked too."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=1e39)
    batch, A = random_grid_batch(cfg)
    device, tok, policy, gen, rng = arms.build(cfg)
    stats = arms.grpo_update(policy, None, torch.optim.Adam(policy.parameters()), cfg, batch, A, None, gen, device)
    assert stats["nonfinite"] == "cls_grad_norm"
    with pytest.raises(g.TrainingError, match="cls_grad_norm is not finite"):
        g.check_finite(stats, 1, cfg)


def test_the_shadow_second_moment_keeps_pace_with_adam_when_a_step_has_no_classifier_share(monkeypatch):
    """adam_pg_step_scale compares Adam's second moment with one that saw the policy gradient alone. With
    the classifier weighted 0 the two are the same average, so the scale is 1, also after an update in
    which no step was labelled (the shadow must advance on every optimizer step, as Adam's own does)."""
    real = g.classification_loss
    monkeypatch.setattr(g, "classification_loss", lambda c, y, labelled: 0.0 * real(c, y, labelled))
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=0.5,
               cls_labels="step")
    batch, A = random_grid_batch(cfg)
    device, tok, policy, gen, rng = arms.build(cfg)
    adam = torch.optim.Adam(policy.parameters())
    n = len(batch["action"])
    none = (torch.zeros(n), torch.zeros(n, dtype=torch.bool))
    assert arms.grpo_update(policy, None, adam, cfg, batch, A, none, gen, device)["adam_pg_step_scale"] is None
    every = (torch.zeros(n), torch.ones(n, dtype=torch.bool))
    stats = arms.grpo_update(policy, None, adam, cfg, batch, A, every, gen, device)
    assert stats["adam_pg_step_scale"] == pytest.approx(1.0, abs=1e-6)


def test_a_ratio_whose_denominator_is_zero_is_logged_as_null_not_infinity():
    """With every advantage 0 the policy gradient is 0: the classifier-to-policy-gradient ratio and the
    Adam scale are undefined, and metrics.jsonl must stay strict JSON."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=0.5)
    batch, A = random_grid_batch(cfg)
    device, tok, policy, gen, rng = arms.build(cfg)
    stats = arms.grpo_update(policy, None, torch.optim.Adam(policy.parameters()), cfg, batch, torch.zeros_like(A),
                          None, gen, device)
    assert stats["cls_pg_grad_ratio"] is None and stats["adam_pg_step_scale"] is None
    assert stats["cls_grad_norm"] > 0
    json.dumps(stats, allow_nan=False)


def test_the_classifier_stream_runs_in_pieces_of_at_most_a_minibatch_with_the_loss_and_gradient_of_one_pass(
        monkeypatch):
    """However few policy minibatches an iteration has, the classifier's share of labelled steps is
    forwarded minibatch_size samples at a time (peak memory stays flat; the last piece padded), with the
    same mean loss and gradient as one forward over the whole share."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, minibatch_size=64,
               cls_weight=0.5)
    batch, A = random_grid_batch(cfg)
    device, tok, policy, gen, rng = arms.build(cfg)
    x, m, a = (torch.as_tensor(batch[k]) for k in ("tokens", "mask", "action"))
    y, labelled = arms.classifier_labels(cfg, batch, A, torch.device("cpu"))  # oracle labels
    jdx = torch.arange(150)
    params = list(policy.parameters())
    sizes, real = [], arms.classifier_verdict
    monkeypatch.setattr(arms, "classifier_verdict", lambda p, xs, *r: sizes.append(len(xs)) or real(p, xs, *r))
    c, cls_loss, grads = arms.classifier_stream(policy, cfg, x, m, a, None, y, labelled, jdx, params)
    assert sizes == [64, 64, 64] and c.shape == (150,)
    for n, pieces in ((10, [64]), (128, [64, 64])):  # a short share is padded; an exact multiple is not
        sizes.clear()
        assert arms.classifier_stream(policy, cfg, x, m, a, None, y, labelled, jdx[:n], params)[0].shape == (n,)
        assert sizes == pieces
    whole = g.classification_loss(real(policy, x[jdx], m[jdx], a[jdx]), y[jdx], labelled[jdx])
    assert cls_loss.item() == pytest.approx(whole.item(), rel=1e-5)
    assert torch.allclose(c, real(policy, x[jdx], m[jdx], a[jdx]), atol=1e-5)
    for mine, one_pass in zip(grads, torch.autograd.grad(0.5 * whole, params, allow_unused=True), strict=True):
        assert (mine is None) == (one_pass is None)
        assert mine is None or torch.allclose(mine, one_pass, rtol=1e-4, atol=1e-7)


def test_fair_update_gigpo_changes_the_advantages_but_not_the_samples_or_the_step_count():
    cfg = tiny(out="unused", env="grid", tasks_per_iter=4, num_generations=4, sft_steps=0)
    device, tok, policy, gen, rng = arms.build(cfg)
    batch = g.rollout(policy, g.make_envs(cfg, 16), tok, np.repeat([3, 4, 5, 6], 4), np.arange(16), gen, device)
    A_traj = g.group_advantages(torch.as_tensor(batch["reward"], dtype=torch.float32).view(4, 4)).view(-1)
    A_grpo = arms.step_advantages(cfg, batch, A_traj, device)
    A_gigpo = arms.step_advantages(tiny(out="unused", adv="gigpo"), batch, A_traj, device)
    assert not torch.equal(A_grpo, A_gigpo)  # the random grid policy revisits states: anchors exist
    out = {}
    for name, A in (("grpo", A_grpo), ("gigpo", A_gigpo)):
        _, _, policy, gen, _ = arms.build(cfg)
        out[name] = arms.grpo_update(policy, None, torch.optim.Adam(policy.parameters()), cfg, batch, A, None, gen,
                                  device)
    informative = len(g.informative_steps(batch, G=4))  # the steps of groups whose outcomes differ
    assert 0 < informative < len(batch["action"])
    assert out["grpo"]["update_samples"] == out["gigpo"]["update_samples"] == informative
    assert out["grpo"]["opt_steps"] == out["gigpo"]["opt_steps"] == math.ceil(informative / cfg.minibatch_size)


@functools.lru_cache(maxsize=None)
def cold_started_state(env: str):
    """A training-sized batch of a short cold start's policy, and what built it (computed once per env)."""
    cfg, device, tok, policy, gen, batch = cold_started_batch(env)
    return cfg, policy.state_dict(), batch


def cold_started_batch(env: str, seed: int = 0, sft_steps: int = 100):
    """A training-sized batch of a short cold start's policy, and what built it."""
    cfg = tiny(out="unused", env=env, cls_weight=1.0, cls_labels="oracle", tasks_per_iter=16, num_generations=8,
               sft_steps=sft_steps, seed=seed)
    device, tok, policy, gen, rng = arms.build(cfg)
    envs_ = g.make_envs(cfg, 128)
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
    batch = g.rollout(policy, envs_, tok, np.repeat(np.arange(16), 8), np.arange(128), gen, device, keys=True)
    return cfg, device, tok, policy, gen, batch


@pytest.mark.parametrize("env", ["text", "grid"])
@pytest.mark.parametrize("source", ["advantage", "oracle", "step", "loop"])
def test_every_label_source_labels_a_real_batch_with_both_verdicts(env, source):
    """On a cold-started policy's batch, each source labels some steps, and calls some bad and some good."""
    cfg, _, batch = cold_started_state(env)
    device = torch.device("cpu")
    R = torch.as_tensor(batch["reward"], dtype=torch.float32).view(16, 8)
    cfg = dataclasses.replace(cfg, cls_labels=source)
    A = arms.step_advantages(cfg, batch, g.group_advantages(R).view(-1), device)
    y, labelled = arms.classifier_labels(cfg, batch, A, device)
    assert 0 < labelled.float().mean() <= 1
    assert 0 < y[labelled].mean() < 1, y[labelled].mean()


# ---------------------------------------------------------------------------------------------
# Labels from what the agent observes, and the action space of an LLM agent
# ---------------------------------------------------------------------------------------------

def test_loop_labels_call_every_step_of_a_detour_bad_and_the_loop_erased_path_of_a_success_good():
    # trajectory 0 (a success): a -> b -> c -> b (a detour: steps 1, 2) -> b ("nothing happens": step 3)
    # -> d -> goal. Trajectory 1 (a failure): a -> b -> a (a loop: steps 6, 7) -> e.
    traj = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    key = ["a", "b", "c", "b", "b", "d", "a", "b", "a"]
    next_key = ["b", "c", "b", "b", "d", "goal", "b", "a", "e"]
    y, labelled = arms.loop_labels(traj, key, next_key, success=np.array([True, False]))
    assert labelled.tolist() == [True, True, True, True, True, True, True, True, False]
    assert y.tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 0]  # steps 0, 4, 5 are the loop-erased path a-b-d-goal


def test_shaped_rewards_take_lambda_off_the_outcome_for_each_step_labelled_bad():
    batch = {"reward": np.array([1.0, 0.0, 0.0, 1.0]), "traj": np.array([0, 0, 1, 1, 1, 2, 3]),
             "flawed": np.array([True, False, True, True, False, False, False]), "success": np.array([1, 0, 0, 1]),
             "key": list("ab") + list("abaxy"), "next_key": list("bc") + list("babyz")}
    oracle = tiny(out="unused", shaping="oracle", shaping_lambda=0.1)
    assert np.allclose(arms.shaped_rewards(oracle, batch), [0.9, -0.2, 0.0, 1.0])
    # loop labels: trajectory 0 goes a -> b -> c; trajectory 1 goes a -> b -> a -> b, a loop back to a
    loop_bad = arms.loop_labels(batch["traj"], batch["key"], batch["next_key"], batch["success"])[0]
    assert loop_bad.tolist() == [0, 0, 1, 1, 0, 0, 0]
    loop = dataclasses.replace(oracle, shaping="loop")
    assert np.allclose(arms.shaped_rewards(loop, batch), [1.0, -0.2, 0.0, 1.0])
    assert arms.shaped_rewards(dataclasses.replace(oracle, shaping="none"), batch) is batch["reward"]


def test_shaping_steps_are_the_steps_of_groups_that_only_the_shaped_reward_separates():
    batch = {"reward": np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
             "shaped_reward": np.array([0.9, 1.0, 0.0, 0.0, 1.0, 0.0]), "traj": np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])}
    assert arms.shaping_steps(batch, G=2).tolist() == [0, 1, 2]  # group (0, 1); (2, 3) ties in both, (4, 5) in neither


def shaping_batch():
    """A batch of a random LavaGrid policy: 8 groups of 8, some whose outcomes tie while their flawed
    counts differ, and the advantages train() gives it under --shaping oracle."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, shaping="oracle")
    device, tok, policy, gen, rng = arms.build(cfg)
    batch = g.rollout(policy, g.make_envs(cfg, 64), tok, np.repeat(np.arange(8), 8), np.arange(64), gen, device)
    batch["shaped_reward"] = arms.shaped_rewards(cfg, batch)
    return cfg, device, batch


def test_fair_update_shaping_keeps_plain_grpos_samples_and_step_count_and_adds_the_tied_groups():
    cfg, device, batch = shaping_batch()
    cfg = dataclasses.replace(cfg, num_iterations=2)  # two epochs: the policy stream's generator is drawn twice
    informative, shaped_only = g.informative_steps(batch, G=8), arms.shaping_steps(batch, G=8)
    assert len(informative) > cfg.minibatch_size and len(shaped_only) > 0  # several minibatches, and a side stream
    out, params, gen_after = {}, {}, {}
    for name, reward, arm in (("plain", batch["reward"], dataclasses.replace(cfg, shaping="none")),
                              ("shaping", batch["shaped_reward"], cfg),
                              ("lambda 0", batch["reward"], dataclasses.replace(cfg, shaping_lambda=0.0))):
        b = batch | {"shaped_reward": arms.shaped_rewards(arm, batch)}
        A = g.group_advantages(torch.as_tensor(reward, dtype=torch.float32).view(8, 8)).view(-1)[b["traj"]]
        _, _, policy, gen, _ = arms.build(cfg)
        out[name] = arms.grpo_update(policy, None, torch.optim.Adam(policy.parameters()), arm, b, A, None, gen, device)
        params[name], gen_after[name] = [p.detach().clone() for p in policy.parameters()], gen.get_state()
    steps = 2 * math.ceil(len(informative) / cfg.minibatch_size)
    assert out["shaping"]["opt_steps"] == out["plain"]["opt_steps"] == steps
    assert out["plain"]["update_samples"] == 2 * len(informative)
    assert out["shaping"]["update_samples"] == 2 * (len(informative) + len(shaped_only))
    assert torch.equal(gen_after["shaping"], gen_after["plain"])  # the side stream never draws from gen
    assert all(torch.equal(p, q) for p, q in zip(params["lambda 0"], params["plain"]))  # lambda 0 is plain GRPO
    assert not all(torch.equal(p, q) for p, q in zip(params["shaping"], params["plain"]))
    # the side stream is trained on: with an advantage on the shaped-only steps alone, the policy moves
    A = torch.zeros(len(batch["traj"]))
    A[shaped_only] = 1.0
    _, _, policy, gen, _ = arms.build(cfg)
    before = [p.detach().clone() for p in policy.parameters()]
    arms.grpo_update(policy, None, torch.optim.Adam(policy.parameters()), cfg, batch, A, None, gen, device)
    assert not all(torch.equal(p, q) for p, q in zip(policy.parameters(), before))


@pytest.mark.parametrize("source", ["oracle", "loop"])
def test_train_gives_grpo_the_shaped_reward_so_groups_whose_outcomes_tie_get_an_advantage(tmp_path, monkeypatch,
                                                                                         source):
    seen = []
    real = arms.grpo_update
    monkeypatch.setattr(arms, "grpo_update", lambda *a, **k: seen.append((a[4], a[5])) or real(*a, **k))
    arms.train(tiny(out=str(tmp_path), env="grid", iters=1, tasks_per_iter=8, num_generations=8, sft_steps=0,
                 quiet=True, no_plots=True, eval_tasks=2, shaping=source, shaping_lambda=0.05))
    batch, A = seen[0]
    if source == "oracle":
        bad = batch["flawed"]
    else:  # the rollout kept what the agent saw, so the loop labels are real ones, not a length penalty
        assert None not in batch["key"] and None not in batch["next_key"]
        bad = arms.loop_labels(batch["traj"], batch["key"], batch["next_key"], batch["success"])[0]
        assert 0 < bad.mean() < 1
    R = torch.as_tensor(batch["reward"] - 0.05 * np.bincount(batch["traj"], weights=bad, minlength=64),
                        dtype=torch.float32)
    assert torch.allclose(A, g.group_advantages(R.view(8, 8)).view(-1)[batch["traj"]])
    tied = arms.shaping_steps(batch, G=8)
    assert len(tied) and (A[tied] != 0).any()  # plain GRPO gives these steps A = 0


# ---------------------------------------------------------------------------------------------
# What carries the cure: the placebo and the labels through the policy share the classifier's steps
# ---------------------------------------------------------------------------------------------

def test_placebo_labels_keep_the_base_rate_and_agree_with_the_oracle_at_chance():
    """A batch of 10 steps, 8 labelled, 3 of them bad (the oracle's labels). Every permutation keeps the
    labelled steps' labels as a multiset and leaves the unlabelled alone; over permutations each labelled
    step is bad with chance 3/8, so agreement with the oracle is (3/8)^2 + (5/8)^2 = 0.53125, chance."""
    y = torch.tensor([1., 0, 0, 1, 0, 1, 0, 0, 1, 1])
    labelled = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    gen, agree, bad_at = torch.Generator().manual_seed(0), [], torch.zeros(10)
    for _ in range(4000):
        shuffled = arms.placebo_labels(y, labelled, gen)
        assert sorted(shuffled[labelled].tolist()) == sorted(y[labelled].tolist())  # the base rate, exactly
        assert torch.equal(shuffled[~labelled], y[~labelled])
        agree.append((shuffled[labelled] == y[labelled]).float().mean().item())
        bad_at += shuffled
    chance, se = (3 / 8) ** 2 + (5 / 8) ** 2, np.std(agree) / np.sqrt(len(agree))
    assert abs(np.mean(agree) - chance) < 4 * se
    np.testing.assert_allclose(bad_at[:8] / 4000, 3 / 8, atol=4 * np.sqrt(3 / 8 * 5 / 8 / 4000))  # no step favoured


@pytest.mark.parametrize("channel", ["placebo", "policy"])
def test_the_placebo_and_the_policy_channel_take_the_classifiers_very_steps_and_step_count(monkeypatch, channel):
    """One update on one batch, with the classifier (head) and with the other channel: the side stream's
    share at every optimizer step is the same list of steps, and so is the number of steps."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=0.5,
               minibatch_size=16)
    batch, A = random_grid_batch(cfg)
    real, shares = arms.classifier_stream, {}

    def recording(policy, cfg, x, m, a, logp_old, y, labelled, jdx, params):
        shares[cfg.cls_channel].append(jdx.tolist())
        return real(policy, cfg, x, m, a, logp_old, y, labelled, jdx, params)
    monkeypatch.setattr(arms, "classifier_stream", recording)
    stats = {}
    for ch in ("head", channel):
        arm = dataclasses.replace(cfg, cls_channel=ch)
        device, tok, policy, gen, rng = arms.build(arm)
        shares[ch] = []
        stats[ch] = arms.grpo_update(policy, None, torch.optim.Adam(policy.parameters()), arm, batch, A, None, gen,
                                  device)
    assert len(shares["head"]) >= 2 and shares["head"] == shares[channel]
    assert stats["head"]["opt_steps"] == stats[channel]["opt_steps"] == len(shares["head"])
    assert stats[channel]["cls_grad_norm"] > 0 and stats[channel]["cls_labelled_frac"] == 1.0


def test_the_policy_channel_is_a_policy_gradient_with_the_label_as_advantage_and_no_classifier():
    """--cls-channel policy's side-stream gradient, on a share of 100 labelled steps (two pieces of 64):
    at the rollout's own policy (ratio 1, no clipping) it is the gradient of
    -w * mean((1 - 2y) * log pi(a|s)), the policy gradient of advantage +1 for good and -1 for bad;
    the classifier head gets none."""
    cfg = tiny(out="unused", env="grid", tasks_per_iter=8, num_generations=8, sft_steps=0, cls_weight=0.7,
               cls_channel="policy")
    batch, _ = random_grid_batch(cfg)
    device, tok, policy, gen, rng = arms.build(cfg)
    x, m, a, logp_old = (torch.as_tensor(batch[k]) for k in ("tokens", "mask", "action", "logp"))
    y, labelled = torch.as_tensor(batch["flawed"]).float(), torch.ones(len(a), dtype=torch.bool)
    assert 0 < y.mean() < 1 and len(a) > 100
    jdx, params = torch.arange(100), list(policy.parameters())
    c, loss, grads = arms.classifier_stream(policy, cfg, x, m, a, logp_old, y, labelled, jdx, params)
    logp = torch.log_softmax(policy(x[jdx], m[jdx])[0], -1).gather(1, a[jdx, None]).squeeze(1)
    expected = torch.autograd.grad(-0.7 * ((1 - 2 * y[jdx]) * logp).mean(), params, allow_unused=True)
    head = [i for i, (n, _) in enumerate(policy.named_parameters()) if n.startswith("cls_")]
    assert c is None and head and all(grads[i] is None for i in head)
    for got, want in zip(grads, expected):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_side_channel_needs_a_weight_and_the_policy_channel_no_design():
    with pytest.raises(ValueError, match="--cls-weight > 0"):
        tiny(out="unused", cls_channel="placebo")
    with pytest.raises(ValueError, match="no --cls-design"):
        tiny(out="unused", cls_channel="policy", cls_weight=0.5, cls_design="separate")
    with pytest.raises(ValueError, match="--cls-channel must be one of"):
        tiny(out="unused", cls_channel="reward", cls_weight=0.5)


def test_help_shows_the_placebo_and_the_policy_channel():
    text = g.make_parser(config=arms.ArmConfig).format_help()
    assert "--cls-channel" in text and "placebo" in text and "--shaping" in text and "--adv" in text
    assert "--cls-channel" not in g.make_parser().format_help()  # grpo_cls.py's own flags are the method's


def test_repaired_loop_labels_leave_the_step_that_closes_a_loop_unlabelled_and_nothing_happens_bad():
    # the trajectories of test_loop_labels_...: step 2 closes the detour b -> c -> b, step 7 the loop a -> b -> a;
    # step 3 is "nothing happens" (b -> b), a loop of one step, which stays bad
    traj = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    key = ["a", "b", "c", "b", "b", "d", "a", "b", "a"]
    next_key = ["b", "c", "b", "b", "d", "goal", "b", "a", "e"]
    y, labelled = arms.loop_labels(traj, key, next_key, success=np.array([True, False]), close_bad=False)
    assert labelled.tolist() == [True, True, False, True, True, True, True, False, False]
    assert y.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 0]


def test_label_quality_counts_agreement_precision_and_recall_against_the_oracle():
    y = torch.tensor([1., 1, 0, 0, 1, 0])
    labelled = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    flawed = torch.tensor([1, 0, 0, 1, 1, 0])
    q = arms.label_quality(y, labelled, flawed)
    # labelled: steps 0-3, agreeing at 0 and 2; labelled bad: 0, 1, of which 0 is flawed; flawed: 0, 3, 4
    assert q == {"label_agree": 0.5, "label_precision": 0.5, "label_recall": pytest.approx(1 / 3)}
    assert arms.label_quality(y, torch.zeros(6, dtype=torch.bool), flawed)["label_precision"] is None


@pytest.mark.parametrize("labels, channel", [("oracle", "head"), ("loop-repaired", "head"), ("oracle", "placebo")])
def test_every_iteration_logs_the_side_streams_label_quality(tmp_path, labels, channel):
    cfg = tiny(out=str(tmp_path), env="grid", cls_weight=0.5, cls_labels=labels, cls_channel=channel, quiet=True)
    arms.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][1:]
    assert all(r["label_agree"] is not None and 0 <= r["label_agree"] <= 1 for r in rows)
    if channel == "head" and labels == "oracle":  # the oracle's own labels agree with it exactly
        assert all(r["label_agree"] == 1.0 and r["label_recall"] in (1.0, None) for r in rows)



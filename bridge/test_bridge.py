"""The bridge's specification: GCDGRPOTrainer is TRL's GRPOTrainer plus the verdict term and nothing else, and
this project's GRPO loss equals verl's. Runs in .venv-bridge (make test-bridge), on the CPU, offline."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import grpo_cls  # noqa: E402
from bridge import example  # noqa: E402
from bridge.trl_gcd import QUESTION, VERDICTS, GCDGRPOTrainer, verdict_inputs  # noqa: E402

CLOSED, OPEN = example.PROMPTS
EOS = 1


def ids(tok, text: str) -> list:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(cls_weight, steps: int, label_fn=None, **kwargs):
    """A trainer after `steps` optimizer steps on the example's twins (cls_weight None: TRL's own trainer)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = example.trainer_for(cls_weight, steps, out, **kwargs)
        if label_fn is not None:
            trainer.label_fn = label_fn
        trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------
# Where the verdict goes
# ---------------------------------------------------------------------------------------------

def test_the_question_is_spliced_after_the_action_and_a_final_eos_is_dropped():
    tok = example.tiny_tokenizer()
    p = torch.tensor([[0] + ids(tok, "the door is open"), ids(tok, "the door is closed door")])   # left-padded
    p_mask = (p != 0).long()
    c = torch.tensor([[ids(tok, "go")[0], EOS, 0], ids(tok, "open door wait")])                   # right-padded
    c_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    q = torch.tensor(ids(tok, QUESTION))
    input_ids, mask, pos = verdict_inputs(p, p_mask, c, c_mask, q, torch.tensor([EOS]))
    words = [[tok.convert_ids_to_tokens(int(t)) if m else "_" for t, m in zip(row, mrow)]
             for row, mrow in zip(input_ids, mask)]
    assert words == [["_", "the", "door", "is", "open", "go", "was", "this", "action", "good", "?", "_", "_"],
                     ["the", "door", "is", "closed", "door", "open", "door", "wait", "was", "this", "action", "good",
                      "?"]]
    assert pos.tolist() == [10, 12]                  # the last question token, whose logits predict the verdict
    assert torch.equal(input_ids[:, :5], p) and torch.equal(mask[:, :5], p_mask)   # the prompt's layout kept


def unpadded_verdict_logits(model, tok, prompt: str, action: str) -> torch.Tensor:
    """The same verdict, scored the plain way: one unpadded sequence, the last position's logits (V,)."""
    x = torch.tensor([ids(tok, prompt) + ids(tok, action) + ids(tok, QUESTION)])
    return model(input_ids=x).logits[0, -1]


def micro_batch(tok):
    """Three completions of equal-length prompts, of two lengths (so their answers sit at different positions):
    "open door" ending with EOS, "open" padded, "go" ending with EOS and padded."""
    p = torch.tensor([ids(tok, CLOSED), ids(tok, OPEN), ids(tok, OPEN)])
    c = torch.tensor([ids(tok, "open door") + [EOS], ids(tok, "open") + [0, 0], ids(tok, "go") + [EOS, 0]])
    return {"prompt_ids": p, "prompt_mask": torch.ones_like(p), "completion_ids": c,
            "completion_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])}


@pytest.mark.parametrize("flip", [False, True])
def test_the_verdict_loss_is_the_cross_entropy_of_the_answer_token_at_each_labelled_completion(flip):
    """Labels (good, flawed, none): the loss is the mean of -log pi(good) at the first and -log pi(bad) at the
    second, scored as one plain unpadded sequence would be, though their answers sit at different positions;
    the unlabelled third adds nothing. Flipping the labels flips the tokens."""
    with tempfile.TemporaryDirectory() as out:
        trainer = example.trainer_for(1.0, 1, out)
    trainer.label_fn = lambda prompts, completions: [not flip, flip, None]
    model, tok = trainer.model, example.tiny_tokenizer()
    loss, _ = trainer.verdict_term(model, micro_batch(tok))
    good, bad = (ids(tok, v)[0] for v in VERDICTS)
    expected = []
    for (prompt, action), label in zip([(CLOSED, "open door"), (OPEN, "open")], [not flip, flip]):
        logp = torch.log_softmax(unpadded_verdict_logits(model, tok, prompt, action).float(), dim=-1)
        expected.append(-logp[good if label else bad])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_no_labels_no_verdict_term():
    with tempfile.TemporaryDirectory() as out:
        trainer = example.trainer_for(1.0, 1, out)
    trainer.label_fn = lambda prompts, completions: [None] * len(prompts)
    loss, accuracy = trainer.verdict_term(trainer.model, micro_batch(example.tiny_tokenizer()))
    assert accuracy is None and loss.item() == 0.0 and loss.requires_grad


def bang_tokenizer():
    """A tokenizer whose id 0 is an ordinary word, "!", as in GPT-2's, Qwen2's and Llama 3's; padding is id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["!", "<pad>", "<eos>"] + example.WORDS[2:]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def test_label_fn_reads_each_row_without_its_padding_and_a_dropped_completion_gets_no_verdict():
    """The text label_fn sees has no trace of padding, whatever the padding id's neighbours are; a completion
    TRL masked out whole (mask_truncated_completions) gets None whatever label_fn says."""
    with tempfile.TemporaryDirectory() as out:
        trainer = example.trainer_for(1.0, 1, out)
    tok = trainer.tok = bang_tokenizer()
    seen = []
    trainer.label_fn = lambda prompts, completions: seen.append((prompts, completions)) or [True, False, True]
    p = torch.tensor([[1] + ids(tok, OPEN), ids(tok, "the door is closed !")])
    c = torch.tensor([ids(tok, "go") + [2, 1], ids(tok, "open wait !"), ids(tok, "wait") + [1, 1]])
    inputs = {"prompt_ids": torch.cat([p, p[:1]]), "prompt_mask": (torch.cat([p, p[:1]]) != 1).long(),
              "completion_ids": c, "completion_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])}
    assert trainer.labels_of(inputs) == [True, False, None]
    assert seen == [([OPEN, "the door is closed !", OPEN], ["go", "open wait !", ""])]


# ---------------------------------------------------------------------------------------------
# TRL's GRPO is left as it is
# ---------------------------------------------------------------------------------------------

def same_training(ours, theirs):
    loss_of = [[row["loss"] for row in t.state.log_history if "loss" in row] for t in (ours, theirs)]
    assert loss_of[0] == loss_of[1] and len(loss_of[0]) == 3
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_with_cls_weight_0_the_losses_and_every_parameter_equal_trls_own_trainer_exactly(loss_type):
    ours, theirs = trained(0.0, 3, loss_type=loss_type), trained(None, 3, loss_type=loss_type)
    assert type(theirs) is GRPOTrainer and isinstance(ours, GCDGRPOTrainer)
    same_training(ours, theirs)


def test_with_no_label_the_verdicts_forward_pass_runs_and_changes_nothing():
    """label_fn says None everywhere: the verdict's forward pass still runs (weighted 0, as every process of a
    distributed run must make the same calls), and the run equals TRL's own, bit for bit."""
    calls = []
    ours = trained(1.0, 3, label_fn=lambda prompts, completions: calls.append(1) or [None] * len(prompts))
    assert len(calls) == 3
    same_training(ours, trained(None, 3))
    assert not any("verdict/loss" in row for row in ours.state.log_history)


def test_the_policy_gradient_sees_the_completions_unchanged_and_the_verdict_is_only_added(monkeypatch):
    """The parent's loss is computed on the very tensors TRL made (no question or answer token in them), and the
    total is that loss plus cls_weight times the verdict's."""
    with tempfile.TemporaryDirectory() as out:
        trainer = example.trainer_for(0.5, 1, out)
    trainer.label_fn = lambda prompts, completions: [True, False, True]
    batch = micro_batch(example.tiny_tokenizer())
    before = {k: v.clone() for k, v in batch.items()}
    seen = []

    def policy_loss(self, model, inputs, *args):
        seen.append({k: inputs[k] for k in before})
        return torch.tensor(0.25)

    monkeypatch.setattr(GRPOTrainer, "compute_loss", policy_loss)
    trainer.current_gradient_accumulation_steps = 2         # Trainer.train sets it; the loss is split as TRL's
    total = trainer.compute_loss(trainer.model.train(), batch)
    assert all(torch.equal(seen[0][k], before[k]) for k in before)
    verdict, _ = trainer.verdict_term(trainer.model, batch)
    torch.testing.assert_close(total, 0.25 + 0.5 * verdict / 2)
    total = trainer.compute_loss(trainer.model.eval(), batch)                   # evaluation: no accumulation
    torch.testing.assert_close(total, 0.25 + 0.5 * trainer.verdict_term(trainer.model, batch)[0])


def test_a_few_steps_raise_the_verdicts_accuracy_on_a_fixed_labelled_batch(monkeypatch):
    """Labels: "wait" is flawed, any other action good (a label that ignores the prompt: the twins' labels are
    the example's, where the verdict does not learn them). Every reward is 0, so the policy gradient is silent
    and the sampled actions keep all three words. On two good and two flawed (prompt, action) pairs the
    untrained model is right on 3; after 20 steps of the whole trainer (sampling, scoring, loss, optimizer)
    it is right on all 4, and its logged verdict loss falls."""
    label = lambda prompts, completions: [example.action_of(c) != "wait" for c in completions]  # noqa: E731
    fixed = [(CLOSED, "open"), (CLOSED, "wait"), (OPEN, "go"), (OPEN, "wait")]
    tok = example.tiny_tokenizer()
    monkeypatch.setattr(example, "label_fn", label)   # verdict_accuracy reads the truth from example.label_fn
    start = example.verdict_accuracy(example.tiny_model(0), tok, fixed)
    trainer = trained(1.0, 20, label_fn=label, reward=lambda prompts, completions, **kw: [0.0] * len(prompts))
    end = example.verdict_accuracy(trainer.model.eval(), tok, fixed)
    losses = [row["verdict/loss"] for row in trainer.state.log_history if "verdict/loss" in row]
    assert (start, end) == (0.75, 1.0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_bad_arguments_are_refused_in_one_line():
    with tempfile.TemporaryDirectory() as out:
        for kwargs, said in [({"cls_weight": -1.0}, "cls_weight must be >= 0"),
                             ({"cls_weight": 0.5, "label_fn": None}, "needs label_fn"),
                             ({"cls_weight": 0.5, "verdicts": (" good", " good")}, "must differ")]:
            with pytest.raises(ValueError, match=said) as err:
                base = example.trainer_for(None, 1, out)
                GCDGRPOTrainer(model=base.model, reward_funcs=example.outcome_reward, args=base.args,
                               train_dataset=base.train_dataset, processing_class=example.tiny_tokenizer(),
                               **{"label_fn": example.label_fn, **kwargs})
            assert "\n" not in str(err.value)


def test_a_label_function_that_returns_the_wrong_thing_is_refused():
    with tempfile.TemporaryDirectory() as out:
        trainer = example.trainer_for(1.0, 1, out)
    trainer.label_fn = lambda prompts, completions: [1, 0, None]
    with pytest.raises(ValueError, match="True, False or None"):
        trainer.verdict_term(trainer.model, micro_batch(example.tiny_tokenizer()))


# ---------------------------------------------------------------------------------------------
# Parity with verl's GRPO (verl.trainer.ppo.core_algos)
# ---------------------------------------------------------------------------------------------

def verl_advantages(R: torch.Tensor, eps: float, by_std: bool) -> torch.Tensor:
    """verl's outcome advantage for R (K, G): one response token per sample, groups by index."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    K, G = R.shape
    A, _ = compute_grpo_outcome_advantage(R.reshape(-1, 1).clone(), torch.ones(K * G, 1),
                                          np.repeat(np.arange(K), G), epsilon=eps, norm_adv_by_std_in_grpo=by_std)
    return A[:, 0].reshape(K, G)


def verl_surrogate(logp, logp_old, A, epsilon: float) -> torch.Tensor:
    """verl's vanilla PPO loss with token-mean aggregation over one token per sample."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config.actor import ActorConfig
    config = ActorConfig(strategy="fsdp", rollout_n=1, clip_ratio=epsilon, clip_ratio_low=epsilon,
                         clip_ratio_high=epsilon, clip_ratio_c=3.0, ppo_micro_batch_size_per_gpu=1)
    loss, _ = compute_policy_loss_vanilla(logp_old[:, None], logp[:, None], A[:, None],
                                          torch.ones(len(A), 1), "token-mean", config)
    return loss


@pytest.mark.parametrize("scale, by_std", [("group", True), ("none", False)])
@pytest.mark.parametrize("kind", ["binary", "continuous", "tied"])
def test_our_group_advantage_equals_verls(scale, by_std, kind):
    """grpo_cls.group_advantages(R, scale) == compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=by_std)
    at the same epsilon (ours defaults to 1e-4, verl's to 1e-6), tied groups (advantage 0) included."""
    g = torch.Generator().manual_seed(0)
    R = {"binary": torch.randint(0, 2, (6, 8), generator=g).float(),
         "continuous": torch.randn(6, 8, generator=g),
         "tied": torch.ones(6, 8)}[kind]
    torch.testing.assert_close(grpo_cls.group_advantages(R, scale, eps=1e-4), verl_advantages(R, 1e-4, by_std),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.1, 0.2, 0.3])
def test_our_clipped_surrogate_equals_verls_vanilla_ppo_loss_and_gradient(epsilon):
    """Ratios in (0.4, 2.5), both signs of A, many of them clipped: the same mean loss and the same gradient."""
    g = torch.Generator().manual_seed(1)
    logp_old = torch.randn(64, generator=g) * 0.5 - 1.0
    step = (torch.rand(64, generator=g) * 2 - 1) * 0.9                       # |log ratio| < 0.9: ratio in (0.4, 2.5)
    A = torch.randn(64, generator=g)
    grads = []
    for loss_fn in (lambda lp: grpo_cls.clipped_surrogate(lp, logp_old, A, epsilon).mean(),
                    lambda lp: verl_surrogate(lp, logp_old, A, epsilon)):
        logp = (logp_old + step).requires_grad_(True)
        loss = loss_fn(logp)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    clipped = ((step.exp() - 1).abs() > epsilon).float().mean()
    assert 0.2 < clipped < 0.95                                    # clipped and unclipped ratios both
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-8)


def test_the_one_difference_verls_dual_clip_caps_the_loss_of_a_negative_advantage_above_ratio_3():
    """verl's vanilla loss is dual-clip PPO (clip_ratio_c = 3): where A < 0 and the ratio passes 3 it stops at
    -3 A; ours (and the paper's GRPO) keeps -ratio * A. (verl also clamps the log ratio to +-20, which no
    sane step reaches.)"""
    logp_old = torch.zeros(4)
    logp = torch.log(torch.tensor([4.0, 4.0, 2.0, 0.5]))
    A = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    ours = grpo_cls.clipped_surrogate(logp, logp_old, A, 0.2)
    theirs = torch.stack([verl_surrogate(logp[i:i + 1], logp_old[i:i + 1], A[i:i + 1], 0.2) for i in range(4)])
    torch.testing.assert_close(ours, torch.tensor([4.0, -1.2, 2.0, 0.8]))
    torch.testing.assert_close(theirs, torch.tensor([3.0, -1.2, 2.0, 0.8]))

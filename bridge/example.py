"""GCDGRPOTrainer end to end on a twin pair, with a tiny Qwen2 built here (no download): python -m bridge.example

The two prompts are one word apart, as Kitchen's twins are: at "the door is closed" the good action is
"open"; at "the door is open" the same action is flawed and "go" is good ("wait" is flawed at both). Actions
are one word among the three (the rest of the vocabulary is suppressed, as grpo_cls.py masks invalid actions).
Each completion's outcome reward is 1 for the good action, and label_fn gives its verdict.

The command trains plain GRPO and GRPO + the verdict from the same random model and prints, for each, the
verdict's accuracy on the six (prompt, action) pairs, the verdict's P(good) for "open" at each twin (a verdict
that tells the twins apart says good at the closed door and bad at the open one), and pi(open | open), the
coupled action where it is flawed. Plain GRPO never trains the verdict: its columns are the model's chance.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

try:
    from trl import GRPOConfig, GRPOTrainer  # noqa: E402
    from datasets import Dataset  # noqa: E402
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402
    from transformers import (PreTrainedTokenizerFast, PrinterCallback, Qwen2Config,  # noqa: E402
                              Qwen2ForCausalLM, set_seed)
except ImportError as missing:
    raise SystemExit(f"python -m bridge.example: {missing.name} is not installed; `make bridge` installs the "
                     "pinned extras (bridge/requirements.txt) into .venv-bridge and runs this") from None

from bridge.trl_gcd import QUESTION, VERDICTS, GCDGRPOTrainer, verdict_inputs  # noqa: E402

WORDS = ["<pad>", "<eos>", "the", "door", "is", "closed", "open", "go", "wait", "was", "this", "action", "good",
         "bad", "?"]
CLOSED, OPEN = "the door is closed", "the door is open"
PROMPTS = [CLOSED, OPEN]
GOOD = {"the door is closed": "open", "the door is open": "go"}
ACTIONS = ("open", "go", "wait")  # the only words an action may be (the rest are suppressed)
FIXED = [(p, a) for p in PROMPTS for a in ACTIONS]  # the verdict's test set: 2 good, 4 flawed


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, built in memory."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised 2-layer Qwen2, hidden size 64: the same from the same seed."""
    set_seed(seed)
    config = Qwen2Config(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def action_of(completion: str) -> str:
    return (completion.split() or [""])[0]


def outcome_reward(prompts, completions, **kwargs) -> list:
    """One outcome reward per completion: 1 when its action is the good one at that prompt."""
    return [float(action_of(c) == GOOD[p.strip()]) for p, c in zip(prompts, completions)]


def label_fn(prompts, completions) -> list:
    """The verdict's labels: good for the good action, flawed for any other word (None would leave one out)."""
    return [action_of(c) == GOOD[p.strip()] for p, c in zip(prompts, completions)]


def trainer_for(cls_weight: float | None, steps: int, out: str, seed: int = 0, lr: float = 3e-3,
                loss_type: str = "dapo", reward=outcome_reward) -> GRPOTrainer:
    """cls_weight None: TRL's own GRPOTrainer; a number: GCDGRPOTrainer with that weight. In float32 (bf16
    off), so that a run is the same on any CPU; "dapo" is TRL's default loss."""
    suppressed = [i for i, w in enumerate(WORDS) if w not in ACTIONS]
    args = GRPOConfig(output_dir=out, use_cpu=True, report_to="none", max_steps=steps, learning_rate=lr,
                      per_device_train_batch_size=16, num_generations=8, max_completion_length=1,
                      logging_steps=1, save_strategy="no", seed=seed, disable_tqdm=True, bf16=False,
                      loss_type=loss_type, generation_kwargs={"suppress_tokens": suppressed})
    data = Dataset.from_dict({"prompt": PROMPTS * 8})
    common = dict(model=tiny_model(seed), reward_funcs=reward, args=args, train_dataset=data,
                  processing_class=tiny_tokenizer())
    if cls_weight is None:
        return GRPOTrainer(**common)
    return GCDGRPOTrainer(**common, cls_weight=cls_weight, label_fn=label_fn)


def encode(tok, texts: list, side: str) -> tuple:
    tok.padding_side = side
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def p_good(model, tok, batch=FIXED) -> torch.Tensor:
    """P(good) against P(bad) for the verdict on each (prompt, action) of a fixed batch: (N,)."""
    p_ids, p_mask = encode(tok, [p for p, _ in batch], "left")
    c_ids, c_mask = encode(tok, [a for _, a in batch], "right")
    question = torch.tensor(tok(QUESTION, add_special_tokens=False)["input_ids"])
    ids, mask, pos = verdict_inputs(p_ids, p_mask, c_ids, c_mask, question, torch.tensor([tok.eos_token_id]))
    logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(batch)), pos]   # (N, V)
    good, bad = (tok(v, add_special_tokens=False)["input_ids"][0] for v in VERDICTS)
    return torch.softmax(logits[:, [good, bad]].float(), dim=-1)[:, 0]


def verdict_accuracy(model, tok, batch=FIXED) -> float:
    """How often the model prefers the right verdict on a fixed labelled batch of (prompt, action)."""
    truth = torch.tensor(label_fn([p for p, _ in batch], [a for _, a in batch]))
    return ((p_good(model, tok, batch) > 0.5) == truth).float().mean().item()


@torch.no_grad()
def p_flawed(model, tok) -> float:
    """pi(open | the door is open), over the three actions the sampler allows: the coupled action at the twin
    where it is flawed."""
    ids, mask = encode(tok, [OPEN], "left")
    logits = model(input_ids=ids, attention_mask=mask).logits[0, -1, [WORDS.index(a) for a in ACTIONS]]
    return float(torch.softmax(logits.float(), dim=-1)[ACTIONS.index("open")])


def report(name: str, model, tok) -> str:
    twins = p_good(model, tok, [(CLOSED, "open"), (OPEN, "open")])
    return (f"{name:<42}{verdict_accuracy(model, tok):>9.2f}{twins[0]:>12.2f}{twins[1]:>12.2f}"
            f"{p_flawed(model, tok):>12.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m bridge.example")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trainer (default 30)")
    ap.add_argument("--cls-weight", type=float, default=1.0, help="the verdict's weight (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="model, sampling and data seed (default 0)")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")                       # transformers' deprecation notices, not ours
    tok = tiny_tokenizer()
    print(f"{'':<42}{'verdict':>9}{'P(good) at the twins':>24}{'pi(open |':>12}")
    print(f"{'':<42}{'accuracy':>9}{'closed,open':>12}{'open,open':>12}{'open)':>12}")
    print(report("at the start", tiny_model(a.seed), tok))
    for name, w in (("plain GRPO", None), (f"GRPO + verdict (cls_weight {a.cls_weight:g})", a.cls_weight)):
        with tempfile.TemporaryDirectory() as out:
            trainer = trainer_for(w, a.steps, out, a.seed)
            trainer.remove_callback(PrinterCallback)          # one line per trainer, not one per step
            trainer.train()
        print(report(f"{name}, {a.steps} steps", trainer.model.eval(), tok))


if __name__ == "__main__":
    main()

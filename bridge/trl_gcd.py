"""The classifier term in TRL: a GRPOTrainer that also trains the actor to say whether its own action was good.

grpo_cls.py trains a verdict head beside a small policy. An LLM agent has no separate head: its verdict is a
token of its own vocabulary. After each sampled action the response is extended with a fixed question and one
answer token,

    <prompt> <action> Was this action good? good|bad

and the model is trained by cross-entropy on that one token (teacher-forced: it is scored, never sampled, in
training; at inference the model can be asked the question), weighted by `cls_weight`:

    loss = TRL's GRPO loss (unchanged) + cls_weight * mean over labelled completions of -log pi(verdict | ...)

The verdict is scored in a forward pass of its own over the labelled completions, so its tokens never enter
the completion ids, the completion mask or the policy-gradient mean, and the environment never sees them.
One verdict per completion: where a completion holds a whole multi-turn episode (TRL's tools,
environment_factory, rollout_func), it is asked once, at the end. A verdict per turn needs each decision as
its own prompt and completion, as grpo_cls.py trains. Text-only models; the temperature TRL applies to the
policy's log-probabilities does not enter the verdict's cross-entropy. With cls_weight = 0 the trainer is
TRL's GRPOTrainer, exactly (bridge/test_bridge.py checks every parameter).

Labels (the truth the verdict is trained towards) come from a function the user passes,
label_fn(prompts, completions) -> [True | False | None] (True: the action was good, False: it was flawed,
None: no label for this one), called on the decoded text of each micro-batch. Anything the environment
reported can feed it: an invalid command, a loop, an oracle's plan.

Pinned to trl==1.16.0 and transformers==5.25.0 (bridge/requirements.txt): only the public compute_loss is
overridden, and the answers' logits are picked per row by a 2-D logits_to_keep, which transformers 5.25
takes. The private attributes it reads are self.eos_token_ids (every token that ends a completion) and
self._metrics, where TRL keeps what it logs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

try:
    from trl import GRPOTrainer
except ImportError:
    raise ImportError("bridge.trl_gcd needs trl==1.16.0: `make bridge` installs the pinned extras "
                      "(bridge/requirements.txt) into .venv-bridge") from None

QUESTION = " Was this action good?"
VERDICTS = (" good", " bad")  # the answer for a good action, the answer for a flawed one

LabelFn = Callable[[list, list], list]


def verdict_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, question_ids, eos_ids):
    """Splice the question in right after each completion's last real token (a final stop token is dropped).

    prompt_ids, prompt_mask (B, P), left-padded as TRL keeps them; completion_ids, completion_mask (B, C),
    right-padded; question_ids (Q,); eos_ids (E,) every token that ends a completion. Returns input_ids,
    attention_mask (B, P + C + Q) and the position (B,) whose logits predict the verdict. The prompt and the
    action keep the positions TRL scores them at."""
    B, P = prompt_ids.shape
    Q = question_ids.numel()
    input_ids = torch.cat([prompt_ids, completion_ids, question_ids.new_zeros(B, Q)], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask, prompt_mask.new_zeros(B, Q)], dim=1)
    n = completion_mask.sum(1)                                                     # (B,) real action tokens
    last = completion_ids.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]           # (B,)
    ends_with_eos = (n > 0) & torch.isin(last, eos_ids)
    n = n - ends_with_eos.long()
    for i in range(B):                                  # a few rows per micro-batch: a loop reads plainly
        start = P + int(n[i])
        input_ids[i, start:start + Q] = question_ids
        attention_mask[i, start:] = 0
        attention_mask[i, start:start + Q] = 1
    return input_ids, attention_mask, P + n + Q - 1


def verdict_loss(logits, targets, verdict_ids):
    """Cross-entropy on the verdict token only. logits (N, V) at the verdict positions; targets (N,) are
    token ids. Also returns how often the right answer outscores the other (the verdict's accuracy)."""
    loss = F.cross_entropy(logits.float(), targets)
    pair = logits[:, verdict_ids]                                                  # (N, 2): good, bad
    said_good = pair[:, 0] > pair[:, 1]
    accuracy = (said_good == (targets == verdict_ids[0])).float().mean()
    return loss, accuracy


class GCDGRPOTrainer(GRPOTrainer):
    """GRPOTrainer + cls_weight * the verdict's cross-entropy. Everything else is TRL's, by construction."""

    def __init__(self, *args, cls_weight: float = 0.5, label_fn: LabelFn | None = None,
                 question: str = QUESTION, verdicts: tuple = VERDICTS, **kwargs):
        if cls_weight < 0:
            raise ValueError(f"cls_weight must be >= 0, got {cls_weight}")
        if cls_weight > 0 and label_fn is None:
            raise ValueError("cls_weight > 0 needs label_fn(prompts, completions) -> [True | False | None]")
        super().__init__(*args, **kwargs)
        self.cls_weight, self.label_fn = cls_weight, label_fn
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.question_ids = torch.tensor(tok(question, add_special_tokens=False)["input_ids"])
        verdict_ids = [tok(v, add_special_tokens=False)["input_ids"] for v in verdicts]
        if any(len(v) != 1 for v in verdict_ids) or verdict_ids[0] == verdict_ids[1]:
            raise ValueError(f"each verdict must be one token, and the two must differ: {verdicts} -> {verdict_ids}")
        self.verdict_ids = torch.tensor([v[0] for v in verdict_ids])
        self.tok = tok

    def labels_of(self, inputs) -> list:
        """label_fn on the decoded text of this micro-batch, each row without its padding. A completion TRL
        has masked out whole (mask_truncated_completions) gets no verdict, as it gets no policy gradient."""
        def texts(ids, mask):
            return self.tok.batch_decode([row[m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
        prompts = texts(inputs["prompt_ids"], inputs["prompt_mask"])
        labels = list(self.label_fn(prompts, texts(inputs["completion_ids"], inputs["completion_mask"])))
        if len(labels) != len(prompts) or not all(y is None or isinstance(y, bool) for y in labels):
            raise ValueError(f"label_fn must return one of True, False or None per completion, got {labels}")
        kept = inputs["completion_mask"].sum(1) > 0
        return [y if bool(k) else None for y, k in zip(labels, kept)]

    def verdict_term(self, model, inputs):
        """The verdict's mean cross-entropy over the labelled completions, and its accuracy. With no label in
        the micro-batch the forward pass still runs, on one row weighted 0, so that every process of a
        distributed run makes the same calls (DDP and FSDP need it); the accuracy is then None."""
        labels = self.labels_of(inputs)
        rows = [i for i, y in enumerate(labels) if y is not None]
        weight = 1.0 if rows else 0.0
        rows = rows or [0]
        device = inputs["prompt_ids"].device
        keep = torch.tensor(rows, device=device)
        eos_ids = torch.tensor(self.eos_token_ids, device=device)         # every id TRL stops a completion at
        ids, mask, pos = verdict_inputs(inputs["prompt_ids"][keep], inputs["prompt_mask"][keep],
                                        inputs["completion_ids"][keep], inputs["completion_mask"][keep],
                                        self.question_ids.to(device), eos_ids)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=pos[:, None], use_cache=False).logits
        verdict_ids = self.verdict_ids.to(device)
        targets = verdict_ids[torch.tensor([0 if labels[i] else 1 for i in rows], device=device)]
        loss, accuracy = verdict_loss(logits[:, 0], targets, verdict_ids)                      # logits (N, 1, V)
        return weight * loss, (accuracy if weight else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.cls_weight == 0:
            return loss
        cls_loss, accuracy = self.verdict_term(model, inputs)
        mode = "train" if self.model.training else "eval"
        if accuracy is not None:                                 # logged by each process for its own rows
            self._metrics[mode]["verdict/loss"].append(cls_loss.item())
            self._metrics[mode]["verdict/accuracy"].append(accuracy.item())
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0   # as TRL's loss
        return loss + self.cls_weight * cls_loss / accumulation

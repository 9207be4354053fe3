"""One twin pair, traced by hand: make explain  ->  docs/walkthrough.md and docs/walkthrough.png

Every number in the walkthrough is computed here, in about half a minute on one CPU thread:
  1. a twin pair from Kitchen's sampler, the words that differ marked;
  2. pi(a | s_good) and pi(a | s_flawed) after the cold start;
  3. one policy-gradient step on (s_good, a) with advantage +1: the change of log pi(a | s_flawed) that
     the gradient inner product predicts, lr * A * <g1, g2>, against the measured one;
  4. the same step with the classifier's term on both twins (good at s_good, bad at s_flawed);
  5. Lemma 3.1 for a group of G = 8: the exact expected advantage of a risky step against a Monte Carlo;
  6. from the stored runs of the sampled-pair matrix (no training): the twins' embedding cosine over a
     run, plain GRPO against the classifier, on the same seed.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import grpo_cls as g
from studies import arms, store, toys

LR, A, W = 0.01, 1.0, 0.5  # the step's learning rate, its advantage, the classifier's weight (the default run's)


def marked(words: list[str], other: list[str]) -> str:
    """The observation with the words that differ from the twin's in bold."""
    return " ".join(f"**{w}**" if w != o else w for w, o in zip(words, other))


def pick_pair(policy, tok, pairs, device) -> tuple[dict, dict]:
    """The sampled pair with the largest cold-start gradient cosine: where coupling should be plainest."""
    d = g.pair_diagnostics(policy, tok, pairs, device, with_grads=True)
    i = int(np.argmax(d["pair_grad_cos"]))
    return pairs[i], {k: v[i] for k, v in d.items() if isinstance(v, list)}


def step_with_classifier(policy, tok, pair: dict, device) -> tuple[float, float, float]:
    """One SGD step on A * log pi(a | s_good) minus W * (BCE of c(s_good, a) against good + BCE of
    c(s_flawed, a) against bad). Returns (measured change of log pi(a | s_flawed), the classifier part's
    first-order prediction lr * <h, g2>, the change of the twins' embedding cosine). Restores the policy."""
    a, params = pair["action"], list(policy.parameters())
    x = torch.stack([torch.as_tensor(tok.encode(pair[k]), device=device) for k in ("obs_good", "obs_flawed")])
    m = torch.as_tensor(np.stack([pair["mask_good"], pair["mask_flawed"]]).astype(bool), device=device)

    def parts():
        logits, phi, cls = policy(x, m)                                             # (2, A), (2, A, d), (2, A)
        logp = torch.log_softmax(logits, -1)[:, a]                                 # (2,)
        bce = g.classification_loss(cls[:, a], torch.tensor([0.0, 1.0]), torch.ones(2, dtype=torch.bool)) * 2
        cos = torch.nn.functional.cosine_similarity(phi[0, a], phi[1, a], dim=0)
        return logp, bce, cos
    logp, bce, cos = parts()
    g2 = torch.autograd.grad(logp[1], params, retain_graph=True, allow_unused=True)
    h = torch.autograd.grad(-W * bce, params, retain_graph=True, allow_unused=True)  # the classifier's ascent
    step = torch.autograd.grad(A * logp[0] - W * bce, params, allow_unused=True)
    predicted_cls = LR * sum((u * v).sum() for u, v in zip(h, g2) if u is not None and v is not None).item()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, step):
            if d is not None:
                p += LR * d
        after_logp, _, after_cos = parts()
        for p, s in zip(params, saved):
            p.copy_(s)
    return (after_logp[1] - logp[1]).item(), predicted_cls, (after_cos - cos).item()


def lemma_rows(G: int = 8, r: float = 0.2, n_groups: int = 200_000) -> list[tuple]:
    """(q, exact E[A 1{risky}], Monte Carlo mean, its standard error) for a few risky-step rates q."""
    rng = np.random.default_rng(0)
    return [(q, toys.lemma31_expected_advantage(q, r, G),
             *toys.simulate_lemma31(q, r, G, 0.7, n_groups, "none", rng)) for q in (0.1, 0.3, 0.5)]


def stored_cosines(seed: int) -> dict:
    """Mean over the 128 pairs of the twins' embedding cosine at each diagnostic, plain and classifier,
    from the stored runs of the sampled-pair matrix (None where they are not stored)."""
    out = {}
    for arm in ("plain", "cls-oracle"):
        d = os.path.join(store.STORE, f"text-{arm}-seed{seed}")
        if store.is_stored(d):
            rows = [r for r in store.load_rows(d) if r.get("pair_embed_cos") is not None]
            out[arm] = ([r["iter"] for r in rows], [float(np.mean(r["pair_embed_cos"])) for r in rows],
                        rows[0]["pair_grad_cos"], rows[-1]["pair_grad_cos"])
    return out


def plot(bars: dict, cosines: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(bars)
    left.bar(np.arange(len(names)) - 0.2, [b[0] for b in bars.values()], 0.4, label="predicted (first order)")
    left.bar(np.arange(len(names)) + 0.2, [b[1] for b in bars.values()], 0.4, label="measured")
    left.set_xticks(range(len(names)), names, fontsize=8)
    left.axhline(0, color="grey", lw=0.8)
    left.set_ylabel("change of log pi(a | flawed twin)", fontsize=8)
    left.set_title("one step on the good twin", fontsize=9)
    left.legend(fontsize=7)
    for arm, (it, cos, _, _) in cosines.items():
        right.plot(it, cos, label="plain GRPO" if arm == "plain" else "oracle classifier")
    right.set_xlabel("iteration", fontsize=8)
    right.set_ylabel("mean embedding cosine of the twins", fontsize=8)
    right.set_title("128 sampled pairs over a run (stored, seed 8201)", fontsize=9)
    if cosines:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.explain",
                                description="One twin pair traced by hand (make explain)")
    p.add_argument("--out", default="docs", help="folder for walkthrough.md and walkthrough.png")
    p.add_argument("--seed", type=int, default=1, help="the cold start's and the sampler's seed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = arms.ArmConfig(env="text", seed=args.seed, cls_weight=W, out="unused", quiet=True, threads=1)
    device, tok, policy, gen, rng = arms.build(cfg)
    envs_ = g.make_envs(cfg, cfg.tasks_per_iter * cfg.num_generations)
    g.cold_start(policy, cfg, envs_, tok, rng, gen, device)
    pair, d = pick_pair(policy, tok, envs_[0].unwrapped.twin_pairs(64, seed=args.seed), device)
    command = envs_[0].unwrapped.commands[pair["action"]]
    good, bad = pair["obs_good"].split(), pair["obs_flawed"].split()
    measured, predicted = toys.one_step_coupling(policy, tok, pair, LR, A, device)
    with_cls, predicted_cls, cos_change = step_with_classifier(policy, tok, pair, device)
    lemma = lemma_rows()
    cosines = stored_cosines(8201)
    os.makedirs(args.out, exist_ok=True)
    plot({"plain step": (predicted, measured), "with classifier": (predicted + predicted_cls, with_cls)},
         cosines, os.path.join(args.out, "walkthrough.png"))
    lines = [
        "# One twin pair, traced by hand", "",
        f"Generated by `make explain` (`python -m studies.explain`, about half a minute on one CPU thread): Kitchen, "
        f"seed {args.seed}, the default model after its cold start. Every number below is computed by it.", "",
        "## 1. The pair", "",
        f"From `KitchenEnv.twin_pairs(64, seed={args.seed})`, the pair whose gradient cosine is largest after the "
        f"cold start. The action is `{command}`. The words that differ are in bold.", "",
        f"- **good twin** (the command is on a shortest plan): {marked(good, bad)}",
        f"- **flawed twin** (the same command is not): {marked(bad, good)}", "",
        "## 2. The policy after the cold start", "",
        f"- pi(`{command}` | good twin) = {d['pair_good_probs']:.3f}",
        f"- pi(`{command}` | flawed twin) = {d['pair_flawed_probs']:.3f}",
        f"- cosine of the gradients g1 = grad log pi(a | good twin) and g2 = grad log pi(a | flawed twin): "
        f"{d['pair_grad_cos']:.3f}; cosine of the pair embeddings phi(s, a): {d['pair_embed_cos']:.3f}", "",
        "The policy can barely tell the two states apart: what raises the command at one raises it at the other.",
        "", "## 3. One policy-gradient step on the good twin", "",
        f"Gradient ascent on A * log pi(a | good twin), A = {A:+g}, learning rate {LR} (plain SGD, no clip):", "",
        f"- predicted change of log pi(a | flawed twin), lr * A * <g1, g2>: **{predicted:+.4f}**",
        f"- measured: **{measured:+.4f}**", "",
        "A step that only rewarded the good twin raised the same command where it is flawed. This is gradient "
        "coupling (the paper's section 3), and the inner product predicts it to first order.", "",
        "## 4. The same step with the classifier", "",
        f"Add the classifier's loss, weight {W}, on both twins with the oracle's labels (good at the good twin, "
        f"bad at the flawed one), summed over the two (a training step averages it over its steps instead). "
        f"Its gradient h joins the step:", "",
        f"- predicted: lr * A * <g1, g2> + lr * <h, g2> = {predicted:+.4f} {predicted_cls:+.4f} = "
        f"**{predicted + predicted_cls:+.4f}**",
        f"- measured: **{with_cls:+.4f}**",
        f"- the twins' embedding cosine changes by {cos_change:+.2e} in this one step", "",
        f"The classifier's term reaches log pi at the flawed twin through the shared trunk and phi. Here it "
        f"{'takes' if predicted_cls < 0 else 'adds'} {abs(predicted_cls):.4f} {'off' if predicted_cls < 0 else 'to'} "
        f"a coupled rise of {predicted:.4f} ({abs(predicted_cls) / abs(predicted):.0%}): one step cannot pull apart "
        f"twins whose embeddings start at cosine {d['pair_embed_cos']:.3f}. Whether many steps do, over a run and "
        f"over many pairs, is what the sampled-pair matrix measures ([claims](claims.md)).", "",
        "## 5. Lemma 3.1 for a group of 8", "",
        "A member of a group of G takes a risky step with chance q, which lowers its success chance by r "
        "(here r = 0.2, from 0.7). With the mean-only baseline A = R - mean(R), the expected advantage carried "
        "by a risky step is exactly ((G-1)/G) q r (q-1): negative, so the outcome reward punishes it in "
        "expectation. Monte Carlo over 200,000 groups:", "",
        "| q | exact ((G-1)/G) q r (q-1) | Monte Carlo | standard error |", "|---|---|---|---|"]
    lines += [f"| {q} | {exact:+.5f} | {mc:+.5f} | {se:.5f} |" for q, exact, mc, se in lemma]
    lines += ["", "So the reward alone pushes a flawed step down; coupling (section 3) is a force against that push.",
              "",
              "## 6. Over a whole run: the twins' embeddings, plain GRPO against the classifier", ""]
    if cosines:
        lines += [f"From the stored runs `results/runs/coupling/text-{{plain,cls-oracle}}-seed8201` (no training): "
                  f"the mean over 128 sampled pairs of the twins' embedding cosine."]
        for arm, (it, cos, grad0, grad1) in cosines.items():
            lines.append(f"- {arm}: {cos[0]:.3f} at the cold start, {cos[-1]:.3f} at iteration {it[-1]}; mean "
                         f"gradient cosine {np.mean(grad0):.3f} -> {np.mean(grad1):.3f}")
    else:
        lines += ["The stored runs of `make coupling` are not in this checkout, so this section is empty."]
    lines += ["", "![the walkthrough](walkthrough.png)", ""]
    with open(os.path.join(args.out, "walkthrough.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

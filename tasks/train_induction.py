#!/usr/bin/env python
"""Train the embedded default model ``induction-2l``.

A tiny 2-layer GPT-2-architecture transformer (4 heads, d_model 64, d_mlp 256,
vocab 64, 64 positions) trained to do induction: previous-token heads in layer 0
feed induction heads in layer 1.

Evaluation / analysis format (what the model is meant to be probed with)::

    [BOS=0] + r + r      r = L distinct tokens from 1..63, L in [8, 15]

Top-1 accuracy is measured on the second copy of r, excluding its first token
(which is unpredictable).

Training format (a superset of the evaluation format)::

    [BOS] + noise(P) + r r r ...      P in [0, 10] per row, body of 32 tokens

Each batch picks a period L in [1, 16]; each row is BOS, P random "noise"
tokens (drawn from the content tokens not in r), then a body of BODY_LEN tokens
that repeats r periodically (so [BOS] + r + r is the P = 0, L = 16 prefix case).
A NO_REPEAT_FRAC fraction of rows is pure noise.  The loss weights the
induction targets (body tokens after the first copy of r and its first repeated
token) with 1 and every other next-token position with NONTARGET_WEIGHT.

Why not train on plain [BOS] + r + r with an unweighted loss: with a fixed
layout and L in [8, 15] the model learns positional shortcuts (fixed-offset /
absolute-position lookups) instead of previous-token + induction heads, and
with distances of >= 8 between copies it prefers "k-th previous token" heads
(k ~ 3..6) over true previous-token heads.  Short periods (down to 1) force the
previous-token offset to be exactly 1, the random prefix removes absolute-
position cues, and down-weighting the unpredictable positions (whose gradient
noise otherwise dominates Adam's normalisation) makes the circuit form in a few
hundred steps.

From step 400 on, a group-lasso penalty (``--head-l1``) on each head's slice of
W_O (attn.c_proj) prunes redundant heads, so the circuit is compact: one
layer-0 previous-token head does the work (other layer-0 heads keep
previous-token-like attention patterns but have ~0 output weights) and layer-1
induction is concentrated in one or two heads instead of spread evenly over four.

After training, heads are identified from attention patterns on held-out
[BOS] + r + r sequences and verified by mean-ablation; results go to meta.json.

Usage::

    python tasks/train_induction.py [--out DIR] [--steps N] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from train_common import optimizer_step, seed_everything
from transformers import GPT2Config, GPT2LMHeadModel

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "circuits" / "builtin" / "induction-2l"

VOCAB = 64
BOS = 0
MIN_LEN, MAX_LEN = 8, 15  # length of r in the eval/analysis format [BOS] + r + r
TRAIN_MIN_PERIOD, TRAIN_MAX_PERIOD = 1, 16  # period L of the repeated body in training
MAX_PREFIX = 10  # random noise tokens before the repeated body in training
BODY_LEN = 32  # repeated body length in training (1 + 10 + 32 <= 64 positions)
NO_REPEAT_FRAC = 0.1
NONTARGET_WEIGHT = 0.1
MIN_ACC = 0.95  # the script fails if the trained model is below this
SCORE_THRESHOLD = 0.4  # attention-score threshold for a candidate head
# a candidate head "matters" if mean-ablating it alone costs this much top-1
# accuracy or raises the NLL of the scored tokens by this many nats (the final
# LayerNorm makes top-1 accuracy insensitive to partially redundant heads)
ABLATION_ACC_DROP = 0.02
ABLATION_NLL_RISE = 0.1


def make_config() -> GPT2Config:
    return GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_inner=256, vocab_size=VOCAB,
        n_positions=64, bos_token_id=BOS, eos_token_id=BOS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",  # needed for output_attentions
    )


def repeated_batch(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Eval format: [BOS] + r + r with r = `length` distinct tokens from 1..VOCAB-1."""
    keys = torch.rand(batch, VOCAB - 1, generator=gen)
    r = keys.argsort(dim=1)[:, :length] + 1
    bos = torch.full((batch, 1), BOS, dtype=torch.long)
    return torch.cat([bos, r, r], dim=1)


def train_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch (see module docstring). Returns tokens and per-target loss weights.

    ``weights[:, t]`` weights the loss of predicting token ``t`` (column 0 unused).
    """
    L = int(torch.randint(TRAIN_MIN_PERIOD, TRAIN_MAX_PERIOD + 1, (1,), generator=gen))
    T = 1 + MAX_PREFIX + BODY_LEN
    perm = torch.rand(batch, VOCAB - 1, generator=gen).argsort(dim=1) + 1
    r = perm[:, :L]
    # noise: tokens not in r, so the only repeats of r's tokens are the planted ones
    x = perm.gather(1, L + torch.randint(0, VOCAB - 1 - L, (batch, T), generator=gen))
    x[:, 0] = BOS
    n_rep = batch - int(round(batch * NO_REPEAT_FRAC))
    prefix = torch.randint(0, MAX_PREFIX + 1, (n_rep, 1), generator=gen)
    pos = torch.arange(T)[None, :] - 1 - prefix  # index within the repeated body
    x[:n_rep] = torch.where(pos >= 0, r[:n_rep].gather(1, pos.clamp(min=0) % L), x[:n_rep])
    weights = torch.full(x.shape, NONTARGET_WEIGHT)
    weights[:n_rep] = torch.where(pos >= L + 1, 1.0, NONTARGET_WEIGHT)
    order = torch.randperm(batch, generator=gen)
    return x[order], weights[order]


def repeated_half_metrics(model, x: torch.Tensor, length: int) -> tuple[float, float]:
    """Top-1 accuracy and mean NLL (nats) on tokens L+2..2L of [BOS]+r+r
    (the second copy of r minus its first token, which is unpredictable)."""
    with torch.no_grad():
        logits = model(x).logits[:, length + 1:2 * length]  # predicts positions L+2..2L
    tgt = x[:, length + 2:2 * length + 1]
    acc = (logits.argmax(-1) == tgt).float().mean().item()
    nll = -logits.log_softmax(-1).gather(-1, tgt[..., None]).mean().item()
    return acc, nll


def eval_sets(n_per_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(L, repeated_batch(n_per_len, L, gen)) for L in range(MIN_LEN, MAX_LEN + 1)]


def metrics(model, sets) -> tuple[float, float]:
    """(accuracy, NLL) averaged over the per-length eval sets."""
    m = np.array([repeated_half_metrics(model, x, L) for L, x in sets])
    return float(m[:, 0].mean()), float(m[:, 1].mean())


def accuracy(model, sets) -> float:
    return metrics(model, sets)[0]


def head_scores(model, sets):
    """Previous-token and induction scores per (layer, head) on [BOS] + r + r."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    prev = torch.zeros(n_layer, n_head)
    ind = torch.zeros(n_layer, n_head)
    for L, x in sets:
        with torch.no_grad():
            att = model(x, output_attentions=True).attentions  # n_layer x [B,H,T,T]
        T = x.shape[1]
        i = torch.arange(1, T)
        # induction: query p = L+1+j (token r[j]) -> key 2+j (token after the first r[j])
        q = torch.arange(L + 1, 2 * L + 1)
        k = q - L + 1
        for layer, a in enumerate(att):
            prev[layer] += a[:, :, i, i - 1].mean(dim=(0, 2))
            ind[layer] += a[:, :, q, k].mean(dim=(0, 2))
    return prev / len(sets), ind / len(sets)


def head_means(model, sets):
    """Mean (over sequences and positions) of each layer's concatenated head outputs."""
    cfg = model.config
    sums = [torch.zeros(cfg.n_embd) for _ in range(cfg.n_layer)]
    counts = [0] * cfg.n_layer
    hooks = []
    for layer, block in enumerate(model.transformer.h):
        def pre(mod, args, layer=layer):
            h = args[0]
            sums[layer] += h.reshape(-1, h.shape[-1]).sum(0)
            counts[layer] += h.shape[0] * h.shape[1]
        hooks.append(block.attn.c_proj.register_forward_pre_hook(pre))
    try:
        for _, x in sets:
            with torch.no_grad():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return [s / c for s, c in zip(sums, counts)]


def ablated_metrics(model, sets, means, heads) -> tuple[float, float]:
    """(accuracy, NLL) with the given (layer, head) outputs replaced by their mean."""
    d = model.config.n_embd // model.config.n_head
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    hooks = []
    for layer, hs in by_layer.items():
        def pre(mod, args, layer=layer, hs=hs):
            h = args[0].clone()
            for head in hs:
                h[..., head * d:(head + 1) * d] = means[layer][head * d:(head + 1) * d]
            return (h,) + tuple(args[1:])
        hooks.append(model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre))
    try:
        return metrics(model, sets)
    finally:
        for h in hooks:
            h.remove()


def head_output_norms(model) -> torch.Tensor:
    """Frobenius norm of each head's slice of W_O (rows of the Conv1D c_proj weight)."""
    d = model.config.n_embd // model.config.n_head
    norms = [blk.attn.c_proj.weight.view(model.config.n_head, d, -1).pow(2).sum((1, 2)).sqrt()
             for blk in model.transformer.h]
    return torch.stack(norms)


def name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1500, help="training steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--head-l1", type=float, default=0.1,
                    help="group-lasso penalty on per-head output weights (sparser circuit)")
    ap.add_argument("--head-l1-start", type=int, default=400)
    args = ap.parse_args()

    seed_everything(args.seed)
    model = GPT2LMHeadModel(make_config())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr,
                            weight_decay=args.weight_decay, betas=(0.9, 0.98))

    def lr_factor(s: int) -> float:  # linear warmup, then cosine decay to 10%
        if s < args.warmup:
            return (s + 1) / args.warmup
        frac = min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    val = eval_sets(32, seed=10_000 + args.seed)

    t0 = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        x, w = train_batch(args.batch, gen)
        logits = model(x).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1),
                              reduction="none")
        w = w[:, 1:].reshape(-1)
        loss = (nll * w).sum() / w.sum()
        if args.head_l1 and step > args.head_l1_start:
            loss = loss + args.head_l1 * head_output_norms(model).sum()
        optimizer_step(model, opt, sched, loss)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            print(f"step {step:5d}  loss {loss.item():.4f}  val_acc {accuracy(model, val):.4f}  "
                  f"t {time.time() - t0:.1f}s", flush=True)
    train_time = time.time() - t0
    model.eval()
    print("per-head W_O norms:", head_output_norms(model).detach().numpy().round(3).tolist())

    # held-out analysis data (seed disjoint from training and validation)
    test = eval_sets(64, seed=20_000 + args.seed)
    final_acc, final_nll = metrics(model, test)
    print(f"held-out repeated-half accuracy: {final_acc:.4f}  nll {final_nll:.4f} "
          f"({args.steps} steps, {train_time:.1f}s)")
    if final_acc < MIN_ACC:
        raise SystemExit(f"accuracy {final_acc:.4f} < {MIN_ACC}; train longer (--steps)")

    cfg = model.config
    prev, ind = head_scores(model, test)
    means = head_means(model, test)
    all_heads = [(l, h) for l in range(cfg.n_layer) for h in range(cfg.n_head)]
    single = {name(l, h): ablated_metrics(model, test, means, [(l, h)]) for l, h in all_heads}
    for l, h in all_heads:
        n = name(l, h)
        print(f"{n}: prev {prev[l, h]:.3f}  induction {ind[l, h]:.3f}  "
              f"ablated acc {single[n][0]:.4f}  nll {single[n][1]:.4f}")

    def matters(n: str) -> bool:
        acc, nll = single[n]
        return final_acc - acc >= ABLATION_ACC_DROP or nll - final_nll >= ABLATION_NLL_RISE

    def select(scores, layer):
        order = torch.argsort(scores[layer], descending=True).tolist()
        cands = [name(layer, h) for h in order if scores[layer, h] > SCORE_THRESHOLD]
        return cands, [n for n in cands if matters(n)]

    prev_cand, prev_heads = select(prev, 0)
    ind_cand, ind_heads = select(ind, 1)

    def parse(n: str) -> tuple[int, int]:
        return int(n[1:n.index(".")]), int(n[n.index(".h") + 2:])

    joint = {
        "previous_token_heads": ablated_metrics(model, test, means, [parse(n) for n in prev_heads]),
        "induction_heads": ablated_metrics(model, test, means, [parse(n) for n in ind_heads]),
    }
    print("previous-token candidates:", prev_cand, "confirmed:", prev_heads)
    print("induction candidates:", ind_cand, "confirmed:", ind_heads)
    print("joint ablation (acc, nll):", joint)
    if not prev_heads or not ind_heads:
        raise SystemExit("no confirmed previous-token / induction heads")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # not needed; keep the dir minimal

    def r4(v):
        return round(float(v), 4)

    meta = {
        "name": "induction-2l",
        "description": (
            "Tiny 2-layer GPT-2 (4 heads/layer, d_model 64, d_mlp 256, vocab 64, 64 positions) "
            "trained for induction: layer-0 previous-token heads feed layer-1 induction heads. "
            "Probe with [BOS=0] + r + r, r = L distinct tokens from 1..63, L in [8, 15]; "
            "the second copy of r (after its first token) is predicted by copying."
        ),
        "bos_token_id": BOS,
        "content_tokens": [1, VOCAB - 1],
        "eval_format": {
            "layout": "[BOS] + r + r",
            "repeat_len_range": [MIN_LEN, MAX_LEN],
            "distinct_tokens_in_r": True,
            "scored_positions": "tokens r[1:] of the second copy (predicted from the previous position)",
        },
        "training_format": {
            "layout": "[BOS] + noise(P) + r repeated periodically (BODY tokens)",
            "period_range": [TRAIN_MIN_PERIOD, TRAIN_MAX_PERIOD],
            "prefix_noise_range": [0, MAX_PREFIX],
            "body_len": BODY_LEN,
            "noise": "uniform over content tokens not in r",
            "no_repeat_fraction": NO_REPEAT_FRAC,
            "loss_weights": {"induction_targets": 1.0, "other_positions": NONTARGET_WEIGHT},
        },
        "trained_steps": args.steps,
        "head_l1": args.head_l1,
        "train_time_s": round(train_time, 1),
        "seed": args.seed,
        "batch_size": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "accuracy_repeated_half": r4(final_acc),
        "nll_repeated_half": r4(final_nll),
        "previous_token_heads": prev_heads,
        "induction_heads": ind_heads,
        "previous_token_scores": {name(l, h): r4(prev[l, h]) for l, h in all_heads},
        "induction_scores": {name(l, h): r4(ind[l, h]) for l, h in all_heads},
        "previous_token_candidates": prev_cand,
        "induction_candidates": ind_cand,
        "ablation": {
            "method": ("mean-ablation: replace one head's output (its slice of the input to "
                       "attn.c_proj) by its mean over held-out [BOS]+r+r sequences; "
                       "metrics on the scored positions of those sequences"),
            "baseline": {"accuracy": r4(final_acc), "nll": r4(final_nll)},
            "single_head": {k: {"accuracy": r4(a), "nll": r4(n)} for k, (a, n) in single.items()},
            "joint": {k: {"accuracy": r4(a), "nll": r4(n)} for k, (a, n) in joint.items()},
            "score_threshold": SCORE_THRESHOLD,
            "criterion": (f"listed heads have score > {SCORE_THRESHOLD} and single-head ablation "
                          f"costs >= {ABLATION_ACC_DROP} accuracy or >= {ABLATION_NLL_RISE} nats"),
        },
        "head_output_norms": {name(l, h): r4(v) for (l, h), v in
                              zip(all_heads, head_output_norms(model).detach().flatten().tolist())},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

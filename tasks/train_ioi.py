#!/usr/bin/env python
"""Train the shipped model ``ioi-3l``: a small GPT-2 that does indirect object identification.

A 3-layer GPT-2-architecture transformer (4 heads/layer, d_model 64, d_mlp 256, 64 positions)
with the real GPT-2 vocabulary (50257 tokens, `circuits.model.loader.gpt2_tokenizer()`), trained on
templated IOI prompts from the same generator family as the built-in task
`circuits.tasks.generators.ioi` (its templates, names, places and objects; ABBA and BABA orders)::

    <|endoftext|>When Mary and John went to the store, John gave a drink to  ->  " Mary"

Training data are fresh random combinations drawn every step, never the evaluation prompts
themselves, and a tenth of the unordered name pairs ({IO, S}) never occurs in training at all:
accuracy on evaluation prompts built from those held-out pairs is reported separately
(`meta.json`, "accuracy_heldout_name_pairs"), as evidence that the model does IOI rather than
recall prompts.

Loss: cross-entropy of the IO name at the last position (full-vocabulary softmax) plus
NONTARGET_WEIGHT (1.0) times the mean next-token cross-entropy at the other positions of the
prompt. The second term matters: predicting the name after the comma (one of the two names seen,
50/50) and the name after " and" (any name but the first) makes the model copy names from the
context through its values. In our runs with the group lasso on and a weight of 0 or 0.3, the
model still reached 0.97-1.0 accuracy but carried the names' identity in its attention patterns
(taking every head's values from the corrupted run kept 95% and 74% of the logit diff), and with
0.3 it got only 0.78 on held-out name pairs.

Embedding: only the 56 tokens that occur in the training prompts get embedding rows; every
other row of the tied 50257 x d_model embedding is initialised to exactly zero and its gradient
is zeroed every step (a hook on wte.weight; no weight decay on wte), so it stays zero (its logit
is exactly 0) and the checkpoint compresses from 13 MB to about 0.6 MB. Because those logits are
exactly 0, the full-vocabulary cross-entropy is computed exactly, and cheaply, as a softmax over
the used tokens plus a constant log(#unused) term in the log-partition function.

From --head-l1-start on, a group-lasso penalty on each head's slice of W_O (attn.c_proj) and on
each MLP's output weights prunes redundant components, so the circuit is compact.

After training, the mechanism is measured on held-out prompts of the built-in task (attention
from the last position to IO / S1 / S2 and from S2 to S1, direct effects on logit(IO) and
logit(S), per-head and per-role resample ablation with the task's ABC-corrupted prompts, and
q / k / v patching per layer), summarised and written to meta.json ("mechanism"). With the
defaults: four layer-1 heads copy both earlier names to the last position, and one layer-2 head
attends from the last position to S2 (the name after the comma) and suppresses it; there is no
duplicate-token detection: S is identified by its slot in the template.

The script is deterministic (seeded, one CPU thread); about 4 minutes on one core.

Usage::

    OMP_NUM_THREADS=1 python tasks/train_ioi.py [--out DIR] [--steps N] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import time
from types import SimpleNamespace

import torch
from train_common import optimizer_step, seed_everything
from transformers import GPT2Config, GPT2LMHeadModel

from circuits.model.loader import gpt2_tokenizer
from circuits.tasks.builtin import build_task
from circuits.tasks.generators import IOI_TEMPLATES, NAMES_A, OBJECTS, PLACES

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_NAME = "ioi-3l"
VOCAB = 50257
HELDOUT_PAIR_FRAC = 0.1        # unordered {IO, S} name pairs never used in training
NONTARGET_WEIGHT = 1.0         # loss weight of the other next-token positions (mean over them)
MIN_ACC = 0.95                 # the script fails if the trained model is below this
EVAL_SEEDS = [0, 1, 2, 3, 123]  # build_task("ioi", ..., seed) sets the accuracy is reported on
ANALYSIS_SEED = 20_000         # held-out build_task seed for the mechanism analysis
ANALYSIS_N = 256
# head roles: thresholds on measured quantities (see `analyse`)
ROLE_ABLATION = 0.1            # resample-ablating the head alone removes >= 10% of the logit diff
ROLE_DIRECT = 0.1              # a direct effect of >= 10% of the clean logit diff
ROLE_ATTN = 0.3                # attention weight that counts as "attends to"
ROLE_ATTN_WEAK = 0.1           # ... for heads that spread attention over several names
ROLE_CRITERIA = (
    f"name mover: raises logit(IO) (relative to the mean name logit) directly by >= {ROLE_DIRECT:.0%} "
    f"of the clean logit diff and attends END->IO >= {ROLE_ATTN_WEAK}, at least as much as END->S2; "
    f"S-suppression: lowers logit(S) directly by >= {ROLE_DIRECT:.0%} of the clean logit diff, attends "
    f"END->S2 >= {ROLE_ATTN} and resample-ablating it alone removes >= {ROLE_ABLATION:.0%} of the logit "
    f"diff; duplicate-token: attends S2->S1 >= {ROLE_ATTN} and its ablation removes >= {ROLE_ABLATION:.0%}")


def make_config(args) -> GPT2Config:
    tok = gpt2_tokenizer()
    return GPT2Config(
        n_layer=args.layers, n_head=args.heads, n_embd=args.d_model, n_inner=args.d_mlp,
        vocab_size=VOCAB, n_positions=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",  # needed for output_attentions
    )


# ---- data --------------------------------------------------------------------------------------

class IOIData:
    """Random IOI prompts from the built-in task's family; `pairs` restricts the {IO, S} pairs."""

    def __init__(self, seed: int):
        self.tok = gpt2_tokenizer()
        self.bos = self.tok.bos_token_id
        self.name_id = {n: self.tok.encode(n)[0] for n in NAMES_A}
        assert all(len(self.tok.encode(n)) == 1 for n in NAMES_A)
        pairs = sorted((a, b) for i, a in enumerate(NAMES_A) for b in NAMES_A[i + 1:])
        rng = random.Random(seed)
        rng.shuffle(pairs)
        n_held = round(len(pairs) * HELDOUT_PAIR_FRAC)
        self.heldout_pairs = {frozenset(p) for p in pairs[:n_held]}
        self.train_pairs = pairs[n_held:]
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = [self.bos] + self.tok.encode(text)
        return ids

    def used_tokens(self) -> list[int]:
        """Every token that can occur in a training prompt or answer."""
        used = {self.bos, *self.name_id.values()}
        a, b = NAMES_A[0], NAMES_A[1]
        for tpl in IOI_TEMPLATES:
            for place in PLACES:
                for obj in OBJECTS:
                    used.update(self.encode(tpl.format(A=a, B=b, C=b, place=place, obj=obj)))
        return sorted(used)

    def sample(self, rng: random.Random) -> tuple[list[int], int, int]:
        pair = list(rng.choice(self.train_pairs))
        rng.shuffle(pair)
        io_, s = pair
        tpl, place, obj = rng.choice(IOI_TEMPLATES), rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (io_, s) if rng.random() < 0.5 else (s, io_)       # ABBA / BABA
        ids = self.encode(tpl.format(A=first, B=second, C=s, place=place, obj=obj))
        return ids, self.name_id[io_], self.name_id[s]

    def batch(self, n: int, rng: random.Random):
        rows = [self.sample(rng) for _ in range(n)]
        T = max(len(r[0]) for r in rows)
        x = torch.full((n, T), self.bos, dtype=torch.long)
        for i, (ids, _, _) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(r[0]) for r in rows])
        assert T <= 64, "prompts must fit n_positions"
        io_ = torch.tensor([r[1] for r in rows])
        return x, lengths, io_


def task_stub():
    """What `build_task` needs of a model: its tokenizer and vocabulary size."""
    return SimpleNamespace(tokenizer=gpt2_tokenizer(), arch=SimpleNamespace(d_vocab=VOCAB), spec=DEFAULT_NAME,
                           meta={})


# ---- evaluation on the built-in task -----------------------------------------------------------

def last_logits(model, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(tokens).logits
    return logits[torch.arange(len(tokens)), lengths - 1]


def task_metrics(model, task) -> dict:
    """Accuracy (logit IO > logit S), mean logit diff, accuracy as top-1 over the vocabulary."""
    lg = last_logits(model, task.clean, task.lengths)
    io_, s = task.answers[:, 0], task.wrongs[:, 0]
    idx = torch.arange(len(lg))
    ld = lg[idx, io_] - lg[idx, s]
    return {"accuracy": (ld > 0).float().mean().item(), "logit_diff": ld.mean().item(),
            "top1": (lg.argmax(-1) == io_).float().mean().item()}


def heldout_pair_rows(task, data: IOIData) -> torch.Tensor:
    inv = {v: k for k, v in data.name_id.items()}
    return torch.tensor([frozenset((inv[int(a)], inv[int(b)])) in data.heldout_pairs
                         for a, b in zip(task.answers[:, 0], task.wrongs[:, 0])])


# ---- mechanism analysis ------------------------------------------------------------------------

def head_z(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the concatenated head outputs (input of attn.c_proj): [B, T, d_model]."""
    zs = []
    hooks = [blk.attn.c_proj.register_forward_pre_hook(lambda m, a: zs.append(a[0].detach()))
             for blk in model.transformer.h]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return zs


def patched_logits(model, tokens, lengths, replace: dict) -> torch.Tensor:
    """Logits at the last position with head outputs replaced: {(layer, head): z [B, T, d_head]}."""
    d = model.config.n_embd // model.config.n_head
    by_layer: dict[int, list] = {}
    for (layer, head), z in replace.items():
        by_layer.setdefault(layer, []).append((head, z))
    hooks = []
    for layer, items in by_layer.items():
        def pre(mod, args, items=items):
            h = args[0].clone()
            for head, z in items:
                h[..., head * d:(head + 1) * d] = z
            return (h,) + tuple(args[1:])
        hooks.append(model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre))
    try:
        return last_logits(model, tokens, lengths)
    finally:
        for h in hooks:
            h.remove()


def name_positions(task):
    """Positions of IO, S1 and S2 in each clean prompt."""
    io_pos, s1_pos, s2_pos = [], [], []
    for row, n, io_, s in zip(task.clean, task.lengths, task.answers[:, 0], task.wrongs[:, 0]):
        row = row[:n].tolist()
        io_pos.append(row.index(int(io_)))
        s_all = [i for i, t in enumerate(row) if t == int(s)]
        assert len(s_all) == 2, s_all
        s1_pos.append(s_all[0])
        s2_pos.append(s_all[1])
    return torch.tensor(io_pos), torch.tensor(s1_pos), torch.tensor(s2_pos)


def qkv_patched_ld(model, task, layers, parts) -> float:
    """Mean logit diff with the q/k/v inputs (`parts`) of every head in `layers` taken from the
    corrupted run (the slices of attn.c_attn's output)."""
    D = model.config.n_embd
    cache = {}

    def run(tokens, patch: bool) -> torch.Tensor:
        hooks = []
        for layer in layers:
            def f(mod, inp, out, layer=layer):
                if not patch:
                    cache[layer] = out.detach()
                    return None
                out = out.clone()
                for part in parts:
                    i = "qkv".index(part)
                    out[..., i * D:(i + 1) * D] = cache[layer][..., i * D:(i + 1) * D]
                return out
            hooks.append(model.transformer.h[layer].attn.c_attn.register_forward_hook(f))
        try:
            return last_logits(model, tokens, task.lengths)
        finally:
            for h in hooks:
                h.remove()

    run(task.corrupted, patch=False)
    return _ld(run(task.clean, patch=True), task)


def _ld(logits, task) -> float:
    idx = torch.arange(len(logits))
    return (logits[idx, task.answers[:, 0]] - logits[idx, task.wrongs[:, 0]]).mean().item()


def analyse(model, task, name_ids: list[int]) -> dict:
    """Measurements on the built-in task's prompts (see `meta.json`, "mechanism")."""
    cfg = model.config
    L, H, d = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    B = len(task)
    idx = torch.arange(B)
    end = task.lengths - 1
    io_pos, s1_pos, s2_pos = name_positions(task)
    io_, s = task.answers[:, 0], task.wrongs[:, 0]
    with torch.no_grad():
        out = model(task.clean, output_attentions=True)
    att = out.attentions
    clean_ld = _ld(out.logits[idx, end], task)
    corrupted_ld = _ld(last_logits(model, task.corrupted, task.lengths), task)

    # direct effect of each head's output at END, through ln_f with the clean run's scale, on
    # logit(IO) - logit(S), and on logit(IO) and logit(S) relative to the mean over the names
    zs = head_z(model, task.clean)
    with torch.no_grad():
        final_pre = _residual_before_ln_f(model, task.clean)[idx, end]          # [B, d_model]
        centred = final_pre - final_pre.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon).sqrt()
        W_U = model.lm_head.weight * model.transformer.ln_f.weight               # [V, d]
        names_mean = W_U[name_ids].mean(0)
        direct = torch.zeros(3, L, H)                                            # ld, io, s
        for layer, blk in enumerate(model.transformer.h):
            W_O = blk.attn.c_proj.weight                                         # Conv1D: [in, out]
            for head in range(H):
                o = zs[layer][idx, end, head * d:(head + 1) * d] @ W_O[head * d:(head + 1) * d]
                o = (o - o.mean(-1, keepdim=True)) / scale
                direct[0, layer, head] = (o * (W_U[io_] - W_U[s])).sum(-1).mean()
                direct[1, layer, head] = (o * (W_U[io_] - names_mean)).sum(-1).mean()
                direct[2, layer, head] = (o * (W_U[s] - names_mean)).sum(-1).mean()

    # resample ablation with the task's corrupted (ABC) prompts: one head at a time
    zc = head_z(model, task.corrupted)
    ablated = torch.zeros(L, H)
    for layer in range(L):
        for head in range(H):
            ablated[layer, head] = _ld(patched_logits(
                model, task.clean, task.lengths, {(layer, head): zc[layer][..., head * d:(head + 1) * d]}), task)

    def attn(layer, head, q, k):
        return att[layer][idx, head, q, k].mean().item()

    heads = {}
    for layer in range(L):
        for head in range(H):
            heads[f"a{layer}.h{head}"] = {
                "end_to_bos": attn(layer, head, end, torch.zeros_like(end)),
                "end_to_io": attn(layer, head, end, io_pos),
                "end_to_s1": attn(layer, head, end, s1_pos),
                "end_to_s2": attn(layer, head, end, s2_pos),
                "s2_to_io": attn(layer, head, s2_pos, io_pos),
                "s2_to_s1": attn(layer, head, s2_pos, s1_pos),
                "direct_logit_diff": direct[0, layer, head].item(),
                "direct_io": direct[1, layer, head].item(),
                "direct_s": direct[2, layer, head].item(),
                "resample_ablated_logit_diff": ablated[layer, head].item(),
                "ablation_effect": 1 - ablated[layer, head].item() / clean_ld,
            }
    qkv = {}
    for part in ("q", "k", "v", "qk"):
        for layer in range(L):
            qkv[f"layer {layer} {part}"] = qkv_patched_ld(model, task, [layer], part)
        qkv[f"all layers {part}"] = qkv_patched_ld(model, task, list(range(L)), part)
    return {"clean_logit_diff": clean_ld, "corrupted_logit_diff": corrupted_ld, "heads": heads,
            "qkv_patched_logit_diff": qkv}


def group_ablation(model, task, heads: list[str]) -> float:
    """Mean logit diff with all these heads' outputs taken from the corrupted run."""
    d = model.config.n_embd // model.config.n_head
    zc = head_z(model, task.corrupted)
    rep = {}
    for n in heads:
        layer, head = int(n[1:n.index(".")]), int(n[n.index(".h") + 2:])
        rep[(layer, head)] = zc[layer][..., head * d:(head + 1) * d]
    return _ld(patched_logits(model, task.clean, task.lengths, rep), task)


def summarise(analysis: dict, found: dict, groups: dict) -> str:
    """One paragraph describing the measured mechanism, numbers included."""
    ld = analysis["clean_logit_diff"]
    heads = analysis["heads"]
    qkv = analysis["qkv_patched_logit_diff"]
    mean = lambda names, key: sum(heads[n][key] for n in names) / len(names)
    parts = [f"Clean logit diff {ld:.2f} (ABC-corrupted {analysis['corrupted_logit_diff']:.2f})."]
    parts.append(f"Taking the queries and keys of every head from the corrupted run leaves it at "
                 f"{qkv['all layers qk']:.2f}; taking the values leaves {qkv['all layers v']:.2f}: the "
                 f"names reach the logits through values; the attention patterns that matter do not "
                 f"depend on which names occur.")
    nm = found["name_mover_heads"]
    if nm:
        parts.append(
            f"Name movers {', '.join(nm)} attend from END to both earlier names (IO {mean(nm, 'end_to_io'):.2f}, "
            f"S1 {mean(nm, 'end_to_s1'):.2f} on average) and raise logit(IO) by {mean(nm, 'direct_io'):.2f} "
            f"and logit(S) by {mean(nm, 'direct_s'):.2f} each (relative to the other names): they copy both "
            f"names, not selectively (direct effect on the logit diff {sum(heads[n]['direct_logit_diff'] for n in nm):.2f} "
            f"together; resample-ablating them all: {groups['name_mover_heads']:.2f}).")
    ss = found["s_suppression_heads"]
    if ss:
        parts.append(
            f"S-suppression {', '.join(ss)} attends{'' if len(ss) == 1 else ' each'} from END to S2 "
            f"({mean(ss, 'end_to_s2'):.2f}) and lowers logit(S) by {-mean(ss, 'direct_s'):.2f} "
            f"(direct effect on the logit diff {sum(heads[n]['direct_logit_diff'] for n in ss):.2f}); "
            f"resample-ablating {'it' if len(ss) == 1 else 'them'}: {groups['s_suppression_heads']:.2f}.")
    dup = max(h["s2_to_s1"] for h in heads.values())
    if not found["duplicate_token_heads"]:
        parts.append(f"No duplicate-token head (largest S2->S1 attention {dup:.2f}).")
    if ss and not found["duplicate_token_heads"] and qkv["all layers qk"] >= 0.9 * ld:
        parts.append("So S is identified by its slot in the template (the name after the comma, "
                     "which is S in every training prompt), not by being repeated: the model computes "
                     "(names in context) - (name in the subject slot).")
    return " ".join(parts)


def _residual_before_ln_f(model, tokens):
    cap = []
    h = model.transformer.ln_f.register_forward_pre_hook(lambda m, a: cap.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        h.remove()
    return cap[0]


def roles(analysis: dict) -> dict:
    """Head roles from the measurements (thresholds ROLE_*; see `ROLE_CRITERIA`)."""
    ld = analysis["clean_logit_diff"]
    out = {"name_mover_heads": [], "s_suppression_heads": [], "duplicate_token_heads": []}
    for name, m in sorted(analysis["heads"].items(), key=lambda kv: -abs(kv[1]["direct_logit_diff"])):
        if m["direct_io"] >= ROLE_DIRECT * ld and m["end_to_io"] >= ROLE_ATTN_WEAK \
                and m["end_to_io"] >= m["end_to_s2"]:
            out["name_mover_heads"].append(name)
        if m["direct_s"] <= -ROLE_DIRECT * ld and m["end_to_s2"] >= ROLE_ATTN \
                and m["ablation_effect"] >= ROLE_ABLATION:
            out["s_suppression_heads"].append(name)
        if m["s2_to_s1"] >= ROLE_ATTN and m["ablation_effect"] >= ROLE_ABLATION:
            out["duplicate_token_heads"].append(name)
    return out


def default_discovery(path: pathlib.Path) -> dict:
    """What `circuits discover MODEL ioi` (default method and selection) finds on the saved model."""
    from circuits import discover, evaluation
    from circuits.model.loader import load
    model = load(str(path))
    found = discover.run(evaluation.prepare(model, build_task("ioi", model, n=64, seed=0)),
                         "eap-ig-activations")
    c = found.circuit
    return {"how": "circuits discover <model> ioi (eap-ig-activations, 64 prompts, seed 0, resample "
                   "ablation, smallest top-n reaching faithfulness 0.8, pruned)",
            "edges": sorted(c.edge_names()), "n_edges": c.n_edges, "total_edges": model.graph.n_edges,
            "faithfulness": round(float(found.faithfulness["faithfulness"]), 4)}


# ---- training ----------------------------------------------------------------------------------

def component_norms(model) -> torch.Tensor:
    """Per-head Frobenius norms of W_O slices [L, H] and per-layer MLP output norms [L]."""
    H = model.config.n_head
    d = model.config.n_embd // H
    heads = torch.stack([blk.attn.c_proj.weight.view(H, d, -1).pow(2).sum((1, 2)).sqrt()
                         for blk in model.transformer.h])
    mlps = torch.stack([blk.mlp.c_proj.weight.pow(2).sum().sqrt() for blk in model.transformer.h])
    return heads, mlps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "circuits" / "builtin" / DEFAULT_NAME)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-mlp", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--nontarget-weight", type=float, default=NONTARGET_WEIGHT)
    ap.add_argument("--head-l1", type=float, default=0.02,
                    help="group-lasso penalty on per-head W_O and per-MLP output weights")
    ap.add_argument("--head-l1-start", type=int, default=500)
    args = ap.parse_args()

    seed_everything(args.seed)
    data = IOIData(args.seed)
    used = torch.tensor(data.used_tokens())
    unused_mask = torch.ones(VOCAB, dtype=torch.bool)
    unused_mask[used] = False
    log_n_unused = math.log(int(unused_mask.sum()))
    pos_of = torch.full((VOCAB,), -1, dtype=torch.long)
    pos_of[used] = torch.arange(len(used))

    model = GPT2LMHeadModel(make_config(args))
    wte = model.transformer.wte.weight
    with torch.no_grad():
        wte[unused_mask] = 0.0
    wte.register_hook(lambda g: g.masked_fill(unused_mask[:, None], 0.0))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or n.endswith("wte.weight") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), fused=True)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine decay to 10%
        if s < args.warmup:
            return (s + 1) / args.warmup
        frac = min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(args.seed)
    stub = task_stub()
    val = build_task("ioi", stub, n=200, seed=10_000 + args.seed)

    t0 = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        x, lengths, io_ = data.batch(args.batch, rng)
        assert (pos_of[x] >= 0).all() and (pos_of[io_] >= 0).all(), "a token outside the used set"
        hidden = model.transformer(x).last_hidden_state                         # [B, T, d] after ln_f
        logits = hidden @ wte[used].T                                           # used tokens only
        lse = torch.logaddexp(logits.logsumexp(-1), torch.tensor(log_n_unused))  # + the zero logits
        nll = lse[:, :-1] - logits[:, :-1].gather(-1, pos_of[x[:, 1:]][..., None])[..., 0]
        B = len(x)
        end = lengths - 1
        target_nll = lse[torch.arange(B), end] - logits[torch.arange(B), end, pos_of[io_]]
        loss = target_nll.mean()
        if args.nontarget_weight:
            valid = torch.arange(x.shape[1] - 1)[None] < (lengths - 1)[:, None]
            loss = loss + args.nontarget_weight * (nll * valid).sum() / valid.sum()
        if args.head_l1 and step > args.head_l1_start:
            hn, mn = component_norms(model)
            loss = loss + args.head_l1 * (hn.sum() + mn.sum())
        optimizer_step(model, opt, sched, loss)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            m = task_metrics(model, val)
            print(f"step {step:5d}  loss {loss.item():.4f}  target_nll {target_nll.mean().item():.4f}  "
                  f"val_acc {m['accuracy']:.4f}  val_ld {m['logit_diff']:.2f}  top1 {m['top1']:.3f}  "
                  f"t {time.time() - t0:.1f}s", flush=True)
    train_time = time.time() - t0
    model.eval()
    assert (wte[unused_mask] == 0).all(), "unused embedding rows must stay exactly zero"
    hn, mn = (t.detach() for t in component_norms(model))
    print("per-head W_O norms:", hn.detach().numpy().round(3).tolist())
    print("per-MLP W_out norms:", mn.detach().numpy().round(3).tolist())

    # accuracy on the built-in task, several seeds; held-out name pairs separately
    acc = {}
    held_correct = held_total = 0
    for seed in EVAL_SEEDS:
        task = build_task("ioi", stub, n=200, seed=seed)
        acc[str(seed)] = task_metrics(model, task)
        rows = heldout_pair_rows(task, data)
        lg = last_logits(model, task.clean, task.lengths)
        ld = lg[torch.arange(len(lg)), task.answers[:, 0]] - lg[torch.arange(len(lg)), task.wrongs[:, 0]]
        held_correct += int((ld[rows] > 0).sum())
        held_total += int(rows.sum())
        print(f"build_task('ioi', n=200, seed={seed}): {acc[str(seed)]}")
    held_acc = held_correct / max(1, held_total)
    print(f"held-out name pairs: accuracy {held_acc:.4f} on {held_total} prompts")
    min_acc = min(v["accuracy"] for v in acc.values())
    if min_acc < MIN_ACC:
        raise SystemExit(f"accuracy {min_acc:.4f} < {MIN_ACC}; train longer (--steps)")

    analysis_task = build_task("ioi", stub, n=ANALYSIS_N, seed=ANALYSIS_SEED)
    analysis = analyse(model, analysis_task, sorted(data.name_id[n] for n in NAMES_A))
    print(f"clean logit diff {analysis['clean_logit_diff']:.3f}, corrupted {analysis['corrupted_logit_diff']:.3f}")
    for name, m in analysis["heads"].items():
        print(f"{name}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    print("q/k/v from the corrupted run:", {k: round(v, 3) for k, v in analysis["qkv_patched_logit_diff"].items()})
    found = roles(analysis)
    groups = {k: group_ablation(model, analysis_task, v) for k, v in found.items() if v}
    print("roles:", found, "group ablation:", groups)
    summary = summarise(analysis, found, groups)
    print(summary)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    circuit = default_discovery(out)
    print("default discovery:", circuit)

    def r4(v):
        return round(float(v), 4)

    meta = {
        "name": out.name,
        "description": (
            f"Small {args.layers}-layer GPT-2 ({args.heads} heads/layer, d_model {args.d_model}, d_mlp "
            f"{args.d_mlp}, 64 positions) with the GPT-2 vocabulary, trained on templated IOI prompts "
            f"(the built-in ioi task's templates, names, places and objects; ABBA and BABA): "
            f"'When Mary and John went to the store, John gave a drink to' -> ' Mary'."),
        "training_format": {
            "layout": "<|endoftext|> + an IOI_TEMPLATES prompt (circuits.tasks.generators), C = S",
            "names": "NAMES_A; IO and S distinct, drawn fresh every step; ABBA/BABA with p = 0.5",
            "heldout_name_pairs": sorted(" / ".join(sorted(p)).replace("  ", " ").strip()
                                         for p in data.heldout_pairs),
            "loss": "cross-entropy (full 50257-token softmax) of IO at the last position"
                    + (f" + {args.nontarget_weight} x mean next-token cross-entropy at the other positions"
                       if args.nontarget_weight else ""),
            "embedding": f"{len(used)} used token rows trained; the other {VOCAB - len(used)} rows are "
                         f"exactly zero (gradient masked, no weight decay)",
        },
        "trained_steps": args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "head_l1": args.head_l1,
        "head_l1_start": args.head_l1_start,
        "seed": args.seed,
        "train_time_s": round(train_time, 1),
        "threads": torch.get_num_threads(),
        "used_tokens": len(used),
        "accuracy": {f"build_task(ioi, n=200, seed={k})": {kk: r4(vv) for kk, vv in v.items()}
                     for k, v in acc.items()},
        "accuracy_definition": "accuracy: logit(IO) > logit(S) at the last position; top1: IO is the "
                               "arg-max over the whole vocabulary; logit_diff: mean logit(IO) - logit(S)",
        "accuracy_heldout_name_pairs": {"accuracy": r4(held_acc), "prompts": held_total,
                                        "over": f"the prompts of the seeds above whose {{IO, S}} pair "
                                                f"never occurred in training"},
        "mechanism": {
            "summary": summary,
            "data": f"build_task('ioi', n={ANALYSIS_N}, seed={ANALYSIS_SEED})",
            "clean_logit_diff": r4(analysis["clean_logit_diff"]),
            "corrupted_logit_diff": r4(analysis["corrupted_logit_diff"]),
            "measures": {
                "end_to_*/s2_to_*": "mean attention from the last position (END) or S2 to BOS, IO, S1, S2",
                "direct_logit_diff": "the head's output at END through ln_f (clean run's scale) onto "
                                     "W_U[IO] - W_U[S]",
                "direct_io/direct_s": "the same onto W_U[IO] (or W_U[S]) minus the mean W_U row of the 20 names",
                "resample_ablated_logit_diff": "mean logit diff with the head's output (all positions) "
                                               "taken from the ABC-corrupted prompt",
                "ablation_effect": "1 - resample_ablated_logit_diff / clean_logit_diff",
                "qkv_patched_logit_diff": "mean logit diff with the q, k, v (or q and k) inputs of every "
                                          "head of a layer taken from the ABC-corrupted prompt",
                "group_ablation_logit_diff": "mean logit diff with all heads of a role resample-ablated",
            },
            "heads": {k: {kk: r4(vv) for kk, vv in v.items()} for k, v in analysis["heads"].items()},
            "qkv_patched_logit_diff": {k: r4(v) for k, v in analysis["qkv_patched_logit_diff"].items()},
            "roles": found,
            "group_ablation_logit_diff": {k: r4(v) for k, v in groups.items()},
            "role_criteria": ROLE_CRITERIA,
        },
        "default_circuit": circuit,
        "head_output_norms": {f"a{l}.h{h}": r4(hn[l, h]) for l in range(args.layers)
                              for h in range(args.heads)},
        "mlp_output_norms": {f"m{l}": r4(mn[l]) for l in range(args.layers)},
    }
    meta.update(found)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

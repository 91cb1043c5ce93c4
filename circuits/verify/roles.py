"""Head roles, measured on real activations.

Task-free diagnostics, on BOS + r + r (r: `half` distinct random tokens, repeated once):
- previous-token score: mean attention from position i to i − 1 (i ≥ 2, BOS excluded);
- duplicate-token score: mean attention from the second copy to the same token's first
  occurrence (i → i − half);
- induction score: mean attention from the second copy to the token after the first
  occurrence (i → i − half + 1), the token an induction head copies.
Attention patterns are computed from the engine's own forward (`patching.run` records the
residual stream; `components.attention_pattern` makes `attend`'s weights explicit), no hooks.

With a task, at the answer position (END): the attention to prompt tokens equal to an answer
(e.g. IOI's IO name) and to a wrong answer (S), the most attended token, and the head's direct
effect: the edge head→logits resample-ablated by the one patching mechanism, measured on the
task metric and on the answer and wrong-answer logits (centered over the vocabulary).

Labels (thresholds in `THRESHOLDS`, all documented in the README):
- `previous-token`, `duplicate-token`, `induction`: that score ≥ 0.4, the highest of the three,
  and the head is active (its output norm on the diagnostic ≥ 0.1 × the largest in its layer;
  a head that attends the right way but writes nothing is not labelled);
- `mover` (name mover): END attends ≥ 0.1 to answer tokens and the head raises the answer's
  logit directly by ≥ 10% of the clean − corrupted logit difference;
- `negative-mover`: END attends ≥ 0.1 to answer tokens and it lowers the answer's logit by ≥ 10%;
- `suppressor` (ioi-3l's S-suppression): END attends ≥ 0.1 to wrong-answer tokens and it lowers
  the wrong answer's logit by ≥ 10%.
A head's label is its task role where one is met (the largest direct logit change decides
between two), else its diagnostic role; `roles` lists every criterion met.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import torch

from circuits import patching
from circuits.model import components as C
from circuits.model.adapters import Positional

THRESHOLDS = {"attention_score": 0.4, "active_norm_ratio": 0.1, "task_attention": 0.1, "direct_logit": 0.1}


class Role(Enum):
    PREVIOUS_TOKEN = "previous-token"
    DUPLICATE_TOKEN = "duplicate-token"
    INDUCTION = "induction"
    MOVER = "mover"
    NEGATIVE_MOVER = "negative-mover"
    SUPPRESSOR = "suppressor"


DIAGNOSTIC = (Role.PREVIOUS_TOKEN, Role.DUPLICATE_TOKEN, Role.INDUCTION)
TASK_ROLES = (Role.MOVER, Role.NEGATIVE_MOVER, Role.SUPPRESSOR)


@dataclass(frozen=True)
class HeadRoles:
    """Per head ("a{layer}.h{head}"): its measures and its label (None: no role met)."""

    model: str
    task: str | None
    rows: dict[str, dict]
    labels: dict[str, str | None]
    facts: dict = field(default_factory=dict)      # clean/corrupted logit difference, examples, ...

    def heads_with(self, role: Role | str) -> list[str]:
        name = role.value if isinstance(role, Role) else role
        return [h for h, lab in self.labels.items() if lab == name]

    def as_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "thresholds": THRESHOLDS, **self.facts,
                "labels": self.labels, "heads": self.rows}


def head_names(graph) -> list[str]:
    a = graph.arch
    return [f"a{layer}.h{h}" for layer in range(a.n_layers) for h in range(a.n_heads)]


# ---- attention from the engine's forward ---------------------------------------------------

def _patterns_and_norms(model, tokens: torch.Tensor, key_valid: torch.Tensor | None = None,
                        chunk: int = 8):
    """Attention patterns [L, N, H, P, P] and head output norms [L, N, H, P] of a clean run."""
    w, g, arch = model.weights, model.graph, model.arch
    pats, norms = [], []
    for lo in range(0, tokens.shape[0], chunk):
        toks = tokens[lo: lo + chunk].to(w.device)
        valid = None if key_valid is None else key_valid[lo: lo + chunk].to(w.device)
        with torch.no_grad():
            run = patching.run(w, g, toks, positions=torch.zeros(toks.shape[0], dtype=torch.long), record=True)
            P = toks.shape[1]
            cos = sin = None
            if arch.positional is Positional.ROTARY:
                cos, sin = w.rot_cos[:P].to(w.dtype), w.rot_sin[:P].to(w.dtype)
            layer_pats, layer_norms = [], []
            for layer, lw in enumerate(w.layers):
                x = C.norm(arch, run.resid[layer], lw.ln1)
                q, k = C.project(x, lw.W_Q, lw.b_Q), C.project(x, lw.W_K, lw.b_K)
                if cos is not None:
                    q, k = C.rotate(arch, q, cos, sin), C.rotate(arch, k, cos, sin)
                layer_pats.append(C.attention_pattern(arch, q, k, valid).float().cpu())
                s0 = g.sender_start[layer]
                out = run.outputs[s0: s0 + arch.n_heads]                        # [H, N, P, d]
                layer_norms.append(out.float().norm(dim=-1).permute(1, 0, 2).cpu())
        pats.append(torch.stack(layer_pats))
        norms.append(torch.stack(layer_norms))
    return torch.cat(pats, 1), torch.cat(norms, 1)


def repeated_tokens(model, n: int = 16, half: int = 20, seed: int = 0) -> tuple[torch.Tensor, int]:
    """[n, 1 + 2·half] BOS + r + r sequences of distinct random content tokens, and half."""
    bos = model.meta.get("bos_token_id", getattr(model.tokenizer, "bos_token_id", None))
    lo, hi = model.meta.get("content_tokens", [1, min(model.arch.d_vocab, 50257) - 2])
    half = max(2, min(half, (model.arch.n_ctx - 1) // 2, (hi - lo + 1)))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        r = (torch.randperm(hi - lo + 1, generator=gen)[:half] + lo).tolist()
        rows.append(([bos] if bos is not None else [0]) + r + r)
    return torch.tensor(rows), half


def diagnostic_scores(model, n: int = 16, half: int = 20, seed: int = 0) -> dict[str, dict]:
    """Previous-token, duplicate-token and induction scores and activity of every head."""
    tokens, half = repeated_tokens(model, n, half, seed)
    pats, norms = _patterns_and_norms(model, tokens)            # [L, N, H, P, P], [L, N, H, P]
    P = tokens.shape[1]
    i_prev = torch.arange(2, P)
    i_rep = torch.arange(half + 1, P)
    prev = pats[:, :, :, i_prev, i_prev - 1].mean((1, 3))                          # [L, H]
    dup = pats[:, :, :, i_rep, i_rep - half].mean((1, 3))
    ind = pats[:, :, :, i_rep, i_rep - half + 1].mean((1, 3))
    norm = norms[:, :, :, 1:].mean((1, 3))                                         # [L, H]
    active = norm / norm.max(1, keepdim=True).values.clamp(min=1e-12)
    rows = {}
    for layer in range(pats.shape[0]):
        for h in range(pats.shape[2]):
            rows[f"a{layer}.h{h}"] = {"previous_token": round(float(prev[layer, h]), 4),
                                      "duplicate_token": round(float(dup[layer, h]), 4),
                                      "induction": round(float(ind[layer, h]), 4),
                                      "output_norm": round(float(norm[layer, h]), 5),
                                      "active_ratio": round(float(active[layer, h]), 4)}
    return rows


# ---- with a task ---------------------------------------------------------------------------

def _in_rows(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, P] bool: tokens[b, p] is one of ids[b] (ids padded with −1)."""
    return (tokens[:, :, None] == ids[:, None, :]).any(-1)


def _centered(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the valid ids of each row of logits − mean logit of the row. logits [B, V]."""
    logits = logits.float()
    c = logits - logits.mean(-1, keepdim=True)
    keep = ids >= 0
    return (c.gather(-1, ids.clamp(min=0)) * keep).sum(-1) / keep.sum(-1).clamp(min=1)


def direct_effects(setup) -> dict[str, dict]:
    """Per head: the task metric, answer logit and wrong-answer logit (centered) in the clean run
    minus with the edge head→logits resample-ablated (positive: the head raises it)."""
    from circuits.tasks.task import metric_values
    g, w = setup.graph, setup.model.weights
    arch = g.arch
    names = head_names(g)
    senders = [g.sender_index[n] for n in names]
    col = g.logits_col
    out = {n: {"direct_metric": 0.0, "direct_answer": 0.0, "direct_wrong": 0.0} for n in names}
    total = len(setup.task)
    V = max(1, min(len(names), 16))
    for chunk in setup.chunks:
        t = chunk.task
        prefix = patching.prefix_at(arch.n_layers, g, chunk.clean, chunk.ablated)
        base_metric = metric_values(setup.task.metric, chunk.clean_logits, t, chunk.clean_logits)
        base_a, base_w = _centered(chunk.clean_logits, t.answers), _centered(chunk.clean_logits, t.wrongs)
        B = len(t)
        for lo in range(0, len(names), V):
            batch = senders[lo: lo + V]
            coef = torch.zeros(len(batch), g.n_senders, g.n_receivers, dtype=w.dtype)
            for v, s in enumerate(batch):
                coef[v, s, col] = 1.0
            prefix.patches.clear()
            with torch.no_grad():
                logits = patching.run(w, g, t.clean.to(w.device), positions=t.positions, coef=coef,
                                      ablated=chunk.ablated, prefix=prefix).logits          # [v·B, vocab]
            m = metric_values(setup.task.metric, logits, t, chunk.clean_logits).view(len(batch), B)
            a = _centered(logits, t.answers.repeat(len(batch), 1).to(logits.device)).view(len(batch), B)
            wr = _centered(logits, t.wrongs.repeat(len(batch), 1).to(logits.device)).view(len(batch), B)
            for v, name in enumerate(names[lo: lo + V]):
                out[name]["direct_metric"] += float((base_metric - m[v].cpu()).sum()) / total
                out[name]["direct_answer"] += float((base_a - a[v].cpu()).sum()) / total
                out[name]["direct_wrong"] += float((base_w - wr[v].cpu()).sum()) / total
    return {n: {k: round(v, 4) for k, v in row.items()} for n, row in out.items()}


def answer_attention(model, task, tokenizer=None) -> dict[str, dict]:
    """Where END (each prompt's last position) attends, per head: to answer tokens, to wrong-answer
    tokens, to BOS, and the most attended token (its text, how often it is the arg-max, weight)."""
    pats, _ = _patterns_and_norms(model, task.clean, task.valid)                   # [L, N, H, P, P]
    N = len(task)
    end = task.positions
    rows_at_end = pats.permute(1, 3, 0, 2, 4)[torch.arange(N), end].permute(1, 0, 2, 3)   # [L, N, H, P]
    P = task.clean.shape[1]
    before_end = torch.arange(P)[None] < end[:, None]                              # [N, P]
    is_answer = _in_rows(task.clean, task.answers) & before_end
    is_wrong = _in_rows(task.clean, task.wrongs) & before_end & ~is_answer
    to_answer = (rows_at_end * is_answer[None, :, None]).sum(-1).mean(1)           # [L, H]
    to_wrong = (rows_at_end * is_wrong[None, :, None]).sum(-1).mean(1)
    to_first = rows_at_end[..., 0].mean(1)
    top = rows_at_end.argmax(-1)                                                   # [L, N, H]
    top_weight = rows_at_end.max(-1).values
    out = {}
    for layer in range(pats.shape[0]):
        for h in range(pats.shape[2]):
            kinds = []
            for b in range(N):
                p = int(top[layer, b, h])
                if is_answer[b, p]:
                    kinds.append("answer")
                elif is_wrong[b, p]:
                    kinds.append("wrong")
                elif p == 0:
                    kinds.append("first token")
                elif p == int(end[b]):
                    kinds.append("itself")
                else:
                    kinds.append(repr(model.to_str_tokens([int(task.clean[b, p])])[0]))
            kind, count = Counter(kinds).most_common(1)[0]
            out[f"a{layer}.h{h}"] = {"end_to_answer": round(float(to_answer[layer, h]), 4),
                                     "end_to_wrong": round(float(to_wrong[layer, h]), 4),
                                     "end_to_first": round(float(to_first[layer, h]), 4),
                                     "end_top": kind, "end_top_share": round(count / N, 3),
                                     "end_top_weight": round(float(top_weight[layer, :, h].mean()), 4)}
    return out


def node_ablation(setup, heads: list[str]) -> dict[str, float]:
    """Exact effect of removing each head: the task metric with every edge out of it ablated
    (the setup's ablation), as a fraction of the clean − empty gap lost. Positive: it helps."""
    g = setup.graph
    idx = g.sender_index
    clean = setup.clean_metric().mean().item()
    empty = setup.metric(g.empty_mask()).mean().item()
    gap = clean - empty
    out = {}
    for name in heads:
        s = idx[name]
        coef = torch.zeros(g.n_senders, g.n_receivers, dtype=setup.model.weights.dtype)
        coef[s] = g.allowed[s].to(coef.dtype)
        m = setup.metric_of_coef(coef, start_layer=int(g.sender_layer[s]) + 1).mean().item()
        out[name] = round((clean - m) / gap, 4) if gap else float("nan")
    return out


# ---- labels --------------------------------------------------------------------------------

def _roles_met(row: dict, logit_gap: float | None) -> list[tuple[Role, float]]:
    """(role, strength) for every criterion the row meets, strongest first within each kind."""
    t = THRESHOLDS
    met = []
    if row.get("active_ratio", 1.0) >= t["active_norm_ratio"]:
        for role, key in ((Role.PREVIOUS_TOKEN, "previous_token"), (Role.DUPLICATE_TOKEN, "duplicate_token"),
                          (Role.INDUCTION, "induction")):
            if row.get(key, 0.0) >= t["attention_score"]:
                met.append((role, row[key]))
    if logit_gap and "direct_answer" in row:
        bar = t["direct_logit"] * abs(logit_gap)
        if row["end_to_answer"] >= t["task_attention"] and row["direct_answer"] >= bar:
            met.append((Role.MOVER, row["direct_answer"] / abs(logit_gap)))
        if row["end_to_answer"] >= t["task_attention"] and row["direct_answer"] <= -bar:
            met.append((Role.NEGATIVE_MOVER, -row["direct_answer"] / abs(logit_gap)))
        if row["end_to_wrong"] >= t["task_attention"] and row["direct_wrong"] <= -bar:
            met.append((Role.SUPPRESSOR, -row["direct_wrong"] / abs(logit_gap)))
    return met


def dominant(met: list[tuple[Role, float]]) -> str | None:
    task = [m for m in met if m[0] in TASK_ROLES]
    pick = max(task or met, key=lambda m: m[1], default=None)
    return None if pick is None else pick[0].value


def measure(model, task=None, *, n_diagnostic: int = 16, seed: int = 0, batch_size: int = 16,
            progress: bool = False) -> HeadRoles:
    """Every head's diagnostics (and, with a task, its attention at END and direct effects)."""
    from circuits import evaluation
    rows = diagnostic_scores(model, n=n_diagnostic, seed=seed)
    facts: dict = {"diagnostic_sequences": n_diagnostic}
    logit_gap = None
    if task is not None:
        setup = evaluation.prepare(model, task, patching.Ablation.RESAMPLE, batch_size=batch_size)
        with torch.no_grad():
            corrupted = patching.run(model.weights, model.graph, task.corrupted.to(model.weights.device),
                                     positions=task.positions).logits
        clean_logits = torch.cat([c.clean_logits for c in setup.chunks])
        ld = lambda lg: (_centered(lg, task.answers) - _centered(lg, task.wrongs)).mean().item()
        from circuits.tasks.task import metric_values
        facts.update({"examples": len(task), "metric": task.metric.value,
                      "clean_metric": round(setup.clean_metric().mean().item(), 4),
                      "corrupted_metric": round(metric_values(task.metric, corrupted, task, clean_logits).mean().item(), 4),
                      "clean_logit_diff": round(ld(clean_logits), 4), "corrupted_logit_diff": round(ld(corrupted), 4)})
        logit_gap = facts["clean_logit_diff"] - facts["corrupted_logit_diff"]
        attention = answer_attention(model, task)
        effects = direct_effects(setup)
        for name in rows:
            rows[name].update(attention[name])
            rows[name].update(effects[name])
    labels = {}
    for name, row in rows.items():
        met = _roles_met(row, logit_gap)
        row["roles"] = [r.value for r, _ in met]
        labels[name] = dominant(met)
    return HeadRoles(model.spec, None if task is None else task.name, rows, labels, facts)


def label_heads(model, task=None, **kwargs) -> dict[str, str | None]:
    """Each head's dominant role ("a3.h1" → "induction", or None); see the module docstring."""
    return measure(model, task, **kwargs).labels

"""Attribution patching: EAP, EAP-IG (inputs and activations) and clean-corrupted.

Every edge score is a linear estimate of the edge's patching effect,

    m(edge ablated) − m(clean) ≈ Σ_{b,p} (ablated_s − clean_s) · ∂m/∂input_r,

turned into an importance (see `methods.base.importance_sign`). One backward pass gives the
gradient at every receiver without per-receiver copies of the residual stream: the engine taps
each head's q/k/v projections, each MLP's and the unembedding's normalized input, and maps those
gradients back through each receiver's own copy of the norm (`components.norm_vjp`).

At position grain the same backward gives per-position scores [P, S, R]: the sum over tokens is
taken per position instead of over all of them. Neuron scores [S, d] come from it too: a
sender's output feeds every later receiver, so its gradient is the sum of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from circuits import patching
from circuits.evaluation import Chunk, Setup
from circuits.model import components as C
from circuits.tasks.task import metric_values


@dataclass(frozen=True)
class Attribution:
    """edges: [S, R] (or [P, S, R] at position grain); neurons: [S, d] or None."""

    edges: torch.Tensor
    neurons: torch.Tensor | None = None


class _Products:
    """Per-token products Σ_d delta_s · G, summed over tokens in float64: into [S, R] scores, or
    per position into [P, S, R] (`group`: the position of every token, [B·T]).

    Both grains sum the same float32 per-token products, only grouped differently, and the sums
    run in float64: so a position-aware score summed over positions is the plain score up to the
    final rounding, whatever the scores' scale. (One float32 matmul over every token would round
    differently from per-position matmuls by ~1e-6 of the scale.)"""

    def __init__(self, delta: torch.Tensor, group: torch.Tensor | None):
        S, B, T, d = delta.shape
        self.flat = delta.float().reshape(S, B * T, d)                                # [S, N, d]
        self.group = group

    def add(self, scores: torch.Tensor, G: torch.Tensor, n_in: int, cols: slice) -> None:
        """G: [B, T, R_c, d] gradients of R_c receivers; adds into scores[(:,) :n_in, cols]."""
        B, T, Rc, d = G.shape
        per_token = torch.bmm(self.flat[:n_in].transpose(0, 1),                          # [N, n_in, R_c]
                              G.float().reshape(B * T, Rc, d).transpose(1, 2))
        if self.group is None:
            scores[:n_in, cols] += per_token.sum(0, dtype=torch.float64)
        else:
            scores[:, :n_in, cols].index_add_(0, self.group, per_token.double())

    def add_rows(self, scores: torch.Tensor, per_row: torch.Tensor, group: torch.Tensor | None, col: int) -> None:
        """per_row: [S, B] products at one token per row (the logits), `group` their positions."""
        if group is None:
            scores[:, col] += per_row.sum(1, dtype=torch.float64)
        else:
            scores[:, :, col].index_add_(0, group, per_row.T.double())


def _receiver_grad_scores(setup: Setup, chunk: Chunk, run: patching.Run, delta: torch.Tensor,
                          scores: torch.Tensor, objective: torch.Tensor, products: _Products,
                          neurons: torch.Tensor | None = None, freeze_norm: bool = False) -> None:
    """Add Σ_{b,p} delta_s · ∂objective/∂input_r into scores [S, R] (float64) for every edge.

    delta: [S, B, P, d] ablated minus clean sender outputs. At position grain (products with a
    group) the sum is per position, into scores [P, S, R]. neurons: also add
    Σ_{b,p} delta_s ⊙ ∂objective/∂output_s into it, [S, d].
    freeze_norm: each receiver's own norm with its scale statistic held constant (GIM), as the
    forward's norms were.
    """
    g, w, arch = setup.graph, setup.model.weights, setup.graph.arch
    keys = list(run.taps)
    tensors = []
    for key in keys:
        tensors += list(run.taps[key][1:])
    grads = torch.autograd.grad(objective, tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, grads)]
    it = iter(grads)
    S = g.n_senders
    by_inputs: dict[int, torch.Tensor] = {}      # n_inputs → summed gradient of those receivers

    def collect(n: int, grad: torch.Tensor) -> None:
        if neurons is not None:
            by_inputs[n] = grad.float() if n not in by_inputs else by_inputs[n] + grad.float()

    for key in keys:
        if key[0] == "attn":
            layer = key[1]
            resid = run.taps[key][0]
            lw = w.layers[layer]
            dq, dk, dv = next(it), next(it), next(it)
            per_recv = torch.cat([torch.einsum("bphe,hde->bphd", dq, lw.W_Q),
                                  torch.einsum("bphe,hde->bphd", dk, lw.W_K),
                                  torch.einsum("bphe,hde->bphd", dv, lw.W_V)], dim=2)
            G = C.norm_vjp(arch, resid.detach(), lw.ln1[0], per_recv, freeze_norm)   # [B, P, R_L, d]
            c0, c1 = g.attn_cols[layer]
            s0 = g.sender_start[layer]
            collect(s0, G.sum(2))
            products.add(scores, G, s0, slice(c0, c1))
        elif key[0] == "mlp":
            layer = key[1]
            x = run.taps[key][0]
            G = C.norm_vjp(arch, x.detach(), w.layers[layer].ln2[0], next(it).unsqueeze(2), freeze_norm)[:, :, 0]
            col = g.mlp_col[layer]
            n_in = int(g.n_inputs[col])
            collect(n_in, G)
            products.add(scores, G[:, :, None], n_in, slice(col, col + 1))
        else:
            x = run.taps[key][0]                                                 # [B, d] at positions
            G = C.norm_vjp(arch, x.detach()[:, None], w.ln_final[0], next(it)[:, None, None],
                           freeze_norm)[:, 0, 0]
            B = x.shape[0]
            rows, pos = torch.arange(B), chunk.task.positions.to(delta.device)
            at_pos = delta[:, rows, pos].float()                                # [S, B, d]
            if neurons is not None:
                full = torch.zeros(delta.shape[1:], dtype=torch.float32, device=delta.device)
                full[rows, pos] = G.float()
                collect(S, full)
            per_row = (at_pos * G.float()[None]).sum(2)                          # [S, B]
            group = None if chunk.groups is None or products.group is None else \
                chunk.groups.group.to(delta.device)[rows, pos]
            products.add_rows(scores, per_row, group, g.logits_col)
    if neurons is not None:
        # sender s feeds every receiver with n_inputs > s: sum their gradients from the top down
        bounds = sorted(by_inputs)
        running = None
        for j in reversed(range(len(bounds))):
            running = by_inputs[bounds[j]] if running is None else running + by_inputs[bounds[j]]
            lo, hi = (bounds[j - 1] if j else 0), bounds[j]
            neurons[lo:hi] += (delta[lo:hi].float() * running[None]).sum((1, 2))


def _ablated_minus_clean(chunk: Chunk, clean_outputs: torch.Tensor) -> torch.Tensor:
    return (chunk.ablated - clean_outputs).expand_as(clean_outputs)


def gradient_scores(setup: Setup, alphas: list[float], mode: str, progress: bool = False,
                    mods: C.GradientMods | None = None) -> torch.Tensor:
    """Σ_edges estimate m(edge ablated) − m(clean), averaging gradients over `alphas`.

    mode "inputs": gradients at input embeddings interpolated corrupted→clean (alpha=1: clean);
    mode "activations": every sender writes ablated + alpha·(clean − ablated) to the stream
    (alpha=0: the run with every sender ablated, where denoising takes its gradient).
    mods: backward-only gradient corrections (GIM). Returns [S, R] float32 (the raw linear
    estimate, summed over examples / total examples); [P, S, R] for a setup prepared with positions.
    """
    return attribute(setup, alphas, mode, progress, mods=mods).edges


def attribute(setup: Setup, alphas: list[float], mode: str, progress: bool = False, *,
              neurons: bool = False, mods: C.GradientMods | None = None) -> Attribution:
    """`gradient_scores`, and with `neurons` the neuron scores [S, d] of the same backward:
    Σ_{b,p} (ablated_s − clean_s) ⊙ ∂m/∂output_s, the linear estimate of ablating each dimension."""
    freeze = mods is not None and mods.freeze_norm
    g, w = setup.graph, setup.model.weights
    shape = (g.n_senders, g.n_receivers) if setup.positions is None else \
        (setup.positions.n, g.n_senders, g.n_receivers)
    scores = torch.zeros(shape, dtype=torch.float64, device=w.device)      # float64 sums: see _Products
    neuron_scores = torch.zeros(g.n_senders, g.arch.d_model, device=w.device) if neurons else None
    n_total = len(setup.task)
    bar = tqdm(total=len(setup.chunks) * len(alphas), desc=f"gradients ({mode})", unit="step",
               disable=not progress)
    for chunk in setup.chunks:
        tokens = chunk.task.clean.to(w.device)
        clean_outputs = chunk.clean.outputs
        delta = _ablated_minus_clean(chunk, clean_outputs)
        group = None if setup.positions is None else chunk.groups.group.reshape(-1).to(w.device)
        products = _Products(delta, group)
        clean_embed = patching.embed(w, tokens)
        corrupt_embed = None
        if mode == "inputs":
            corrupt_embed = delta[0] + clean_embed                         # the ablated input sender
        for alpha in alphas:
            kept = chunk.take_clean_graph() if (mode == "inputs" and alpha == 1.0) else None
            if kept is not None and mods is not None and mods.active:
                kept = None                 # that run had no backward-only changes: run one with them
            if kept is not None:        # the setup's clean run, with its graph: no second clean forward
                with torch.enable_grad():
                    values = metric_values(setup.task.metric, kept.logits, chunk.task, chunk.clean_logits)
                    objective = values.sum() / (n_total * len(alphas))
                    _receiver_grad_scores(setup, chunk, kept, delta, scores, objective, products,
                                          neuron_scores, freeze)
                bar.update(1)
                continue
            stream = None
            if mode == "inputs":
                embeds = corrupt_embed + alpha * (clean_embed - corrupt_embed)
            else:
                embeds = clean_embed
                stream = (clean_outputs + delta) + alpha * (-delta)        # ablated + α(clean − ablated)
            embeds = embeds.detach().requires_grad_(True)
            with torch.enable_grad():
                run = patching.run(w, g, tokens, positions=chunk.task.positions, taps=True,
                                   embeds=embeds, stream=stream, grad_mods=mods)
                values = metric_values(setup.task.metric, run.logits, chunk.task, chunk.clean_logits)
                objective = values.sum() / (n_total * len(alphas))
                _receiver_grad_scores(setup, chunk, run, delta, scores, objective, products, neuron_scores,
                                      freeze)
            bar.update(1)
    bar.close()
    return Attribution(scores.float(), neuron_scores)

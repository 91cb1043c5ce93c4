"""The one patching mechanism: a forward pass in which receivers read ablated sender outputs.

For every receiver r the engine feeds

    input_r = stream_r + Σ_s coef[s, r] · (ablated_s − current_s)

where stream_r is what r reads in this very forward, current_s is sender s's output in this
forward and ablated_s its output under the ablation (the corrupted run for resample ablation).
`coef = 1 − mask` for a circuit; fractional or per-variant coefficients serve attribution and
batched search. At position grain (`groups`: the position of every token) the coefficient has a
position dimension, coef[p, s, r], applied to the tokens of position p: one matmul per position.
A neuron mask ([S, d], 1 = kept) ablates the other output dimensions of each sender for every
receiver: the sender's output in this forward (current_s) is then partly ablated already.
Every method (evaluation, ACDC, EAP, EAP-IG, verification) sets `coef` and nothing else. Receivers without any ablated incoming edge read the shared residual stream, so
the full circuit costs one plain forward; patched receivers get their own copy only where needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from circuits.graph import Graph
from circuits.model import components as C
from circuits.model.adapters import Norm, Positional, Weights
from circuits.patch_sums import Deltas, KeptDeltas, KeptGroupDeltas, Prefix, Workspace
from circuits.positions import TokenGroups


class Ablation(Enum):
    RESAMPLE = "resample"   # the corrupted prompt's sender output
    MEAN = "mean"           # mean over a reference set and its positions
    MEAN_POS = "mean-pos"   # mean over a reference set, per position
    ZERO = "zero"


@dataclass
class Run:
    """What a forward returns. logits: [V·B, vocab] at `positions`, or [V·B, P, vocab]."""

    logits: torch.Tensor
    outputs: torch.Tensor | None = None          # [S, B, P, d] when record=True
    resid: list[torch.Tensor] | None = None      # resid entering each layer, then the final one
    taps: dict = field(default_factory=dict)     # tensors whose gradients give receiver gradients


def _active_columns(coef: torch.Tensor | None, n_receivers: int) -> torch.Tensor:
    if coef is None:
        return torch.zeros(n_receivers, dtype=torch.bool)
    return (coef != 0).reshape(-1, n_receivers).any(0).cpu()


def _qkv(arch, lw, resid, coef, deltas, cols, c0, mlp_col, s0, freeze_norm=False):
    """q, k, v of one layer ([N, P, n, dh] each) and, with mlp_col, the stream entering the layer
    plus the MLP's patch from senders before s0 ([N·P, d]).

    Receivers whose coefficient columns are identical (typically: every edge ablated) share one
    patched input, so a sparse circuit costs a few extra projections, not one per receiver. When
    every head of a kind reads a patched input (dense circuits), the kind's projections run as
    one batched matmul over the heads' own inputs.
    """
    N, P, d = resid.shape
    shared_norm = None
    inputs = scale = fold = None
    mlp_patch = None
    group_of: dict[int, int] = {}
    if len(cols) or mlp_col >= 0:
        idx = (c0 + cols).tolist() + ([mlp_col] if mlp_col >= 0 else [])
        key = coef[..., :s0, idx].movedim(-1, 0).reshape(len(idx), -1)          # one row per receiver
        uniq, inverse = key, torch.arange(len(idx), device=key.device)
        if not coef.requires_grad:        # unique has no gradient; learned masks rarely repeat
            u, inv = torch.unique(key, dim=0, return_inverse=True)
            if 2 * len(u) <= len(idx):    # worth sharing; else keep column order (heads' rows are slices)
                uniq, inverse = u, inv
        # the stream is added inside the patch's matmul: patched inputs = resid + patch
        inv = inverse.tolist()
        reps = [idx[inv.index(u)] for u in range(len(uniq))]                  # a column of each unique row
        patches = deltas.patch(uniq.view(-1, *coef.shape[:-2], s0).movedim(0, -1), s0,
                               plus=resid.reshape(N * P, d), cols=reps)             # [n_u, N·P, d]
        if mlp_col >= 0:
            mlp_patch = patches[inverse[-1]]
            inverse = inverse[:-1]
        if len(cols):
            if arch.norm is Norm.RMS and not freeze_norm and not torch.is_grad_enabled():
                # norm(x) @ W = (x @ (w ⊙ W)) · rms_inverse(x): the scale goes on the projections
                # (e numbers per token and head), no normalized copy of each patched input is made
                inputs, scale, fold = patches, C.rms_inverse(patches, arch.norm_eps), lw.ln1[0]
            else:
                inputs = C.norm(arch, patches, lw.ln1, freeze_norm)                  # [n_u, N·P, d]
        group_of = dict(zip(cols.tolist(), inverse.tolist()))

    def folded(W: torch.Tensor) -> torch.Tensor:
        """The weights that read a patched input: with the norm's weight folded in, when it is."""
        return W if fold is None else W * fold[:, None]

    def project_patched(u: int, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The projections [N, P, n, e] of patched input u."""
        x = inputs[u].view(N, P, d)
        if fold is None:
            return C.project(x, W, b)
        return C.project(x, folded(W), None).mul_(scale[u].view(N, P, 1, 1)).add_(b)

    out = []
    H, KV = arch.n_heads, arch.n_kv_heads
    for offset, n, W, b in ((0, H, lw.W_Q, lw.b_Q), (H, KV, lw.W_K, lw.b_K), (H + KV, KV, lw.W_V, lw.b_V)):
        groups = [group_of.get(offset + h) for h in range(n)]
        if n > 1 and None not in groups and len(set(groups)) > 1:
            if groups == list(range(groups[0], groups[0] + n)):
                pick = slice(groups[0], groups[0] + n)
            else:
                pick = torch.tensor(groups, device=inputs.device)
            out.append(C.project_receivers(inputs[pick], folded(W), b, N, P,
                                           None if fold is None else scale[pick]))   # x: [n, N·P, d]
            continue
        by_input: dict[int, list[int]] = {}
        plain = []
        for h, u in enumerate(groups):
            (plain if u is None else by_input.setdefault(u, [])).append(h)
        if not by_input:
            if shared_norm is None:
                shared_norm = C.norm(arch, resid, lw.ln1, freeze_norm)
            out.append(C.project(shared_norm, W, b))
            continue
        if len(by_input) == 1 and not plain:            # one input for every head of the kind
            (u,) = by_input
            out.append(project_patched(u, W, b))
            continue
        t = resid.new_empty(N, P, n, W.shape[2])
        if plain:
            if shared_norm is None:
                shared_norm = C.norm(arch, resid, lw.ln1, freeze_norm)
            t[:, :, plain] = C.project(shared_norm, W[plain], b[plain])
        for u, heads in by_input.items():
            t[:, :, heads] = project_patched(u, W[heads], b[heads])
        out.append(t)
    return (*out, mlp_patch)


def embed(w: Weights, tokens: torch.Tensor) -> torch.Tensor:
    """The input sender's output: token (and learned position) embeddings [B, P, d]."""
    x = w.W_E[tokens]
    if w.W_pos is not None and w.arch.positional is Positional.LEARNED:
        x = x + w.W_pos[: tokens.shape[1]]
    return x


def run(w: Weights, graph: Graph, tokens: torch.Tensor | None, *,
        positions: torch.Tensor | None = None,
        coef: torch.Tensor | None = None,
        ablated: torch.Tensor | None = None,
        prefix: Prefix | None = None,
        record: bool = False,
        taps: bool = False,
        embeds: torch.Tensor | None = None,
        stream: torch.Tensor | None = None,
        groups: TokenGroups | None = None,
        neurons: torch.Tensor | None = None,
        grad_mods: C.GradientMods | None = None,
        workspace: Workspace | None = None) -> Run:
    """One forward pass of the engine.

    tokens: [B, P]. positions: [B] the position whose logits are wanted (None: all positions).
    coef: [V, S, R] or [S, R]: how much of each edge is ablated (1 − mask); V variants of the
    batch run side by side and return V·B rows. ablated: [S, B|1, P|1, d] sender outputs under
    the ablation (needed when coef is given). prefix: start at prefix.layer from a cached state.
    record: keep every sender's output and the residual stream per layer (V must be 1).
    taps: keep the tensors `receiver_grads` needs. embeds: [B, P, d] replaces the input sender's
    output. stream: [S, B, P, d] values every sender writes to the stream instead of its own
    output (straight-through: gradients still flow through the sender's computation).
    groups: the position of every token; coef is then [G, S, R] or [V, G, S, R], position-aware.
    neurons: [S, d] the output dimensions of each sender kept clean (1) or ablated (0) for every
    receiver (needs `ablated`).
    grad_mods: backward-only changes (GIM); the forward's values stay the same.
    workspace: buffers kept from an earlier forward of the same batch (circuit evaluation).
    """
    mods = grad_mods if grad_mods is not None and grad_mods.active else None
    freeze = mods is not None and mods.freeze_norm
    arch = graph.arch
    if coef is not None and coef.dim() == (2 if groups is None else 3):
        coef = coef.unsqueeze(0)
    if groups is not None and coef is not None:
        if coef.dim() != 4 or coef.shape[1] != groups.n:
            raise ValueError(f"position-aware coef should be [V, {groups.n}, S, R], got {tuple(coef.shape)}")
        groups = groups.to(w.device)
    V = 1 if coef is None else coef.shape[0]
    if coef is not None:
        if ablated is None:
            raise ValueError("patching needs the ablated sender outputs")
        coef = coef.to(device=w.device, dtype=w.dtype)
    if (record or taps) and V != 1:
        raise ValueError("record/taps need a single variant")
    off = None
    if neurons is not None:
        if ablated is None or prefix is not None:
            raise ValueError("a neuron mask needs the ablated sender outputs and a forward from the input")
        off = 1 - neurons.to(device=w.device, dtype=w.dtype)                   # [S, d]: ablated dims
    active = _active_columns(coef, graph.n_receivers)
    start = 0 if prefix is None else prefix.layer

    if prefix is None:
        x0 = embed(w, tokens) if embeds is None else embeds
        if stream is not None:
            x0 = x0 + (stream[0] - x0).detach()
        B, P, d = x0.shape
        resid = x0
    else:
        resid = prefix.resid
        B, P, d = resid.shape
    n_prefix = 0 if prefix is None else prefix.delta.shape[0]    # senders cached in the prefix
    deltas = None
    if coef is not None:
        differentiable = coef.requires_grad and torch.is_grad_enabled()
        # The kept-edges form is valid for the plain grain only: one variant from the input, no
        # position groups, no neuron mask, nothing differentiated (it writes into buffers in place).
        plain = (prefix is None and V == 1 and groups is None and off is None
                 and not torch.is_grad_enabled())
        if plain:
            deltas = KeptDeltas(coef, graph, B, P, d, resid, workspace)
        elif (prefix is None and V == 1 and groups is not None and off is None
              and not torch.is_grad_enabled()):
            deltas = KeptGroupDeltas(coef, graph.allowed, graph.sender_start, groups, B, P, d, resid)
        else:
            deltas = Deltas(prefix, graph.n_senders - n_prefix, V, B, P, d, resid, groups,
                             differentiable=differentiable)
    outputs = resid.new_zeros(graph.n_senders, B, P, d) if record else None
    resid_log: list[torch.Tensor] = []

    def emit(s: int, out: torch.Tensor) -> None:
        if record:
            outputs[s] = out
        if deltas is not None:
            deltas.put(s, ablated[s], out)

    def neuron_ablated(first: int, out: torch.Tensor, heads: bool) -> torch.Tensor:
        """Sender outputs (heads: [N, P, H, d], else [N, P, d]) with the dims off the mask ablated."""
        n = out.shape[2] if heads else 1
        abl = ablated[first : first + n]                                          # [n, B|1, P|1, d]
        abl = abl.permute(1, 2, 0, 3) if heads else abl[0]
        if abl.shape[0] > 1 and out.shape[0] != abl.shape[0]:
            abl = abl.repeat(out.shape[0] // abl.shape[0], *([1] * (abl.dim() - 1)))
        return out + (off[first : first + n] if heads else off[first]) * (abl - out)

    if off is not None and prefix is None:
        resid = neuron_ablated(0, resid, heads=False)
    if V > 1:
        resid = resid.repeat(V, 1, 1)
    if prefix is None:
        emit(0, resid)
    if positions is not None:
        positions = positions.to(resid.device).repeat(V)
    key_valid = None
    if arch.pad_token_id is not None and tokens is not None:
        key_valid = (tokens.to(resid.device) != arch.pad_token_id).repeat(V, 1)
    cos = sin = None
    if arch.positional is Positional.ROTARY:
        cos, sin = w.rot_cos[:P].to(resid.dtype), w.rot_sin[:P].to(resid.dtype)
    tap: dict = {}

    for layer in range(start, arch.n_layers):
        lw = w.layers[layer]
        s0 = graph.sender_start[layer]
        if record:
            resid_log.append(resid)
        # ---- attention receivers: q, k, v of each head (and the MLP's share, fused) ----
        c0, c1 = graph.attn_cols[layer]
        col = graph.mlp_col[layer]
        cols = torch.nonzero(active[c0:c1]).flatten()
        fuse_mlp = col >= 0 and bool(active[col])
        q, k, v, mlp_patch = _qkv(arch, lw, resid, coef, deltas, cols, c0, col if fuse_mlp else -1, s0,
                                  freeze)
        H = arch.n_heads
        if taps:
            tap[("attn", layer)] = (resid, q, k, v)
        temperature = 1.0
        if mods is not None:
            q, k, v = (C.scale_grad(q, mods.q_scale), C.scale_grad(k, mods.k_scale),
                       C.scale_grad(v, mods.v_scale))
            temperature = mods.softmax_temperature
        if cos is not None:
            q, k = C.rotate(arch, q, cos, sin), C.rotate(arch, k, cos, sin)
        heads = C.head_outputs(lw, C.attend(arch, q, k, v, key_valid, temperature))     # [N, P, H, d]
        if stream is not None:
            heads = heads + (stream[s0 : s0 + H].permute(1, 2, 0, 3) - heads).detach()
        if off is not None:
            heads = neuron_ablated(s0, heads, heads=True)
        for h in range(H):
            emit(s0 + h, heads[:, :, h])
        attn_out = heads.sum(2) + lw.b_O
        if not arch.has_mlp:
            resid = resid + attn_out
            continue
        # ---- MLP receiver ----
        mid = resid if arch.parallel else resid + attn_out
        x = mid
        if fuse_mlp:
            n_in = int(graph.n_inputs[col])
            x = mlp_patch.view(mid.shape) if arch.parallel else mlp_patch.view(mid.shape) + attn_out
            if n_in > s0:                                    # the layer's own heads (sequential)
                x = x + deltas.patch(coef[..., s0:n_in, col : col + 1], n_in, first=s0).view(mid.shape)
        h2 = C.norm(arch, x, lw.ln2, freeze)
        if taps:
            tap[("mlp", layer)] = (x, h2)
        out = C.mlp(arch, lw, h2)
        if stream is not None:
            out = out + (stream[s0 + H] - out).detach()
        if off is not None:
            out = neuron_ablated(s0 + H, out, heads=False)
        emit(s0 + H, out)
        resid = (resid + attn_out + out) if arch.parallel else (mid + out)

    if record:
        resid_log.append(resid)
    # ---- logits receiver ----
    col = graph.logits_col
    x = resid
    if active[col]:
        x = deltas.patch(coef[..., col : col + 1], graph.n_senders, plus=resid.reshape(-1, d), cols=[col]).view(resid.shape)
    if positions is not None:
        x = x[torch.arange(x.shape[0], device=x.device), positions]
    hf = C.norm(arch, x, w.ln_final, freeze)
    if taps:
        tap[("logits",)] = (x, hf)
    logits = hf @ w.W_U
    if w.b_U is not None:
        logits = logits + w.b_U
    return Run(logits, outputs, resid_log if record else None, tap)


def prefix_at(layer: int, graph: Graph, clean: Run, ablated: torch.Tensor) -> Prefix:
    """The state entering `layer` when no edge into an earlier receiver is ablated."""
    n = graph.sender_start[layer] if layer < graph.arch.n_layers else graph.n_senders
    return Prefix(layer, clean.resid[layer], ablated[:n] - clean.outputs[:n])


def ablated_outputs(w: Weights, graph: Graph, ablation: Ablation, *, corrupted: torch.Tensor,
                    reference: torch.Tensor | None = None,
                    reference_valid: torch.Tensor | None = None,
                    batch_size: int | None = None) -> torch.Tensor:
    """Sender outputs under an ablation, [S, B|1, P|1, d].

    corrupted: [B, P] corrupted prompts (resample). reference: [B', P'] prompts whose mean is
    used by mean ablations (default: the corrupted prompts); reference_valid: [B', P'] bool
    marking real (non-padding) tokens. Means are summed `batch_size` reference rows at a time.
    """
    B, P = corrupted.shape
    S, d = graph.n_senders, graph.arch.d_model
    with torch.no_grad():
        if ablation is Ablation.ZERO:
            return torch.zeros(S, 1, 1, d, dtype=w.dtype, device=w.device)
        if ablation is Ablation.RESAMPLE:
            return run(w, graph, corrupted.to(w.device), positions=torch.zeros(B, dtype=torch.long),
                       record=True).outputs
        ref = corrupted if reference is None else reference
        valid = torch.ones(ref.shape, dtype=torch.bool) if reference_valid is None else reference_valid
        if ablation is Ablation.MEAN_POS and ref.shape[1] < P:
            raise ValueError(f"mean-pos ablation needs reference prompts at least {P} tokens long")
        total = count = None
        size = batch_size or ref.shape[0]
        for start in range(0, ref.shape[0], size):
            part = slice(start, start + size)
            outs = run(w, graph, ref[part].to(w.device), positions=torch.zeros(len(ref[part]), dtype=torch.long),
                       record=True).outputs
            weight = valid[part].to(device=w.device, dtype=w.dtype)[None, :, :, None]    # [1, b, P', 1]
            dims = (1, 2) if ablation is Ablation.MEAN else (1,)
            add, n = (outs * weight).sum(dims), weight.sum(dims)
            total, count = (add, n) if total is None else (total + add, count + n)
        mean = total / count.clamp(min=1)
        if ablation is Ablation.MEAN:
            return mean[:, None, None]
        return mean[:, None, :P]                                                   # [S, 1, P, d]

"""The pieces of a transformer block as plain functions over `adapters.Weights` tensors.

Every function accepts inputs shared by all receivers (`[N, P, d]`) or one input per receiver
(`[N, P, R, d]`), so the engine only pays for per-receiver copies where a mask needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from circuits.model.adapters import ACTIVATIONS, Arch, LayerWeights, Norm


@dataclass(frozen=True)
class GradientMods:
    """Backward-only changes to the forward (GIM, Edin et al. 2025); forward values are unchanged.

    freeze_norm: the norms' scale statistic (1/std or 1/rms) is a constant in the backward pass;
    softmax_temperature: the attention softmax's backward is taken at scores / T (T > 1: softer,
    so saturated patterns still pass gradient); q_scale, k_scale, v_scale: the gradients that
    reach q, k and v are multiplied by these (the three interact multiplicatively in attention, so
    their first-order shares overcount). All off (the defaults) = the plain backward.
    """

    freeze_norm: bool = False
    softmax_temperature: float = 1.0
    q_scale: float = 1.0
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def active(self) -> bool:
        return (self.freeze_norm or self.softmax_temperature != 1.0
                or (self.q_scale, self.k_scale, self.v_scale) != (1.0, 1.0, 1.0))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward; its gradient times `scale` in the backward."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, float(scale))


class _SoftmaxTemperedBackward(torch.autograd.Function):
    """softmax(x) forward; the backward of softmax(x / T) without its 1/T factor (GIM)."""

    @staticmethod
    def forward(ctx, x, T: float):
        ctx.T = T
        ctx.save_for_backward(x)
        return torch.softmax(x, -1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        soft = torch.softmax(x / ctx.T, -1)
        return soft * (grad - (grad * soft).sum(-1, keepdim=True)), None


def norm(arch: Arch, x: torch.Tensor, params: tuple[torch.Tensor | None, torch.Tensor | None],
         freeze: bool = False) -> torch.Tensor:
    """Apply the architecture's normalization over the last dimension (fused ATen kernels).

    freeze: the scale statistic is detached (GIM); same values, gradient as if it were constant."""
    w, b = params
    kind = arch.norm
    if kind is Norm.NONE:
        return x.view_as(x)     # a tensor of its own: gradients tapped here are this reader's only
    if freeze:
        centred = x - x.mean(-1, keepdim=True) if kind in (Norm.LAYER, Norm.LAYER_PRE) else x
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + arch.norm_eps).detach()
        if w is not None and kind in (Norm.LAYER, Norm.RMS):
            y = y * w
        return y + b if b is not None and kind is Norm.LAYER else y
    d = (x.shape[-1],)
    if kind is Norm.LAYER:
        return F.layer_norm(x, d, w, b, arch.norm_eps)
    if kind is Norm.LAYER_PRE:
        return F.layer_norm(x, d, None, None, arch.norm_eps)
    return F.rms_norm(x, d, w if kind is Norm.RMS else None, arch.norm_eps)


def rms_inverse(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) over the last dimension, for inference: RMS norm without its copy of x, whose
    scale can then go on a projection instead (norm(x) @ W = (x @ (w ⊙ W)) · rms_inverse(x)).
    Equal to `norm`'s scale to float rounding. x: [..., d] (strided views read at full speed:
    a vector norm, not an einsum) → [...]."""
    return torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def norm_vjp(arch: Arch, x: torch.Tensor, w: torch.Tensor | None, grad_out: torch.Tensor,
             freeze: bool = False) -> torch.Tensor:
    """Gradient w.r.t. the norm's input, given the gradient w.r.t. its output.

    x: [N, P, d] (the shared input); grad_out: [N, P, R, d], one gradient per receiver that reads
    x through its own copy of the norm. Returns [N, P, R, d] in float32. freeze: the scale
    statistic held constant (see `norm`).
    """
    g = grad_out.float()
    if arch.norm is Norm.NONE:
        return g
    x32 = x.float()
    if arch.norm in (Norm.LAYER, Norm.LAYER_PRE):
        x32 = x32 - x32.mean(-1, keepdim=True)
    inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + arch.norm_eps)   # [N, P, 1]
    xhat = (x32 * inv).unsqueeze(-2)                                          # [N, P, 1, d]
    if w is not None and arch.norm in (Norm.LAYER, Norm.RMS):
        g = g * w.float()
    gx = g if freeze else g - xhat * (g * xhat).mean(-1, keepdim=True)
    if arch.norm in (Norm.LAYER, Norm.LAYER_PRE):
        gx = gx - g.mean(-1, keepdim=True)
    return gx * inv.unsqueeze(-1)


def project(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per-head projection. x: [N, P, d] or [N, P, n, d]; W: [n, d, e]; returns [N, P, n, e]."""
    n, d, e = W.shape
    if x.dim() == 3:
        out = (x @ W.permute(1, 0, 2).reshape(d, n * e)).view(*x.shape[:2], n, e)
    else:
        out = torch.einsum("bpnd,nde->bpne", x, W)
    return out if b is None else out + b


def project_receivers(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, N: int, P: int,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each receiver's own projection. x: [n, N·P, d] (receiver-major, may be strided); W: [n, d, e];
    scale: [n, N·P] multiplies the products before the bias is added (a norm folded into W).

    Returns [N, P, n, e] (a view)."""
    if scale is None:
        out = torch.baddbmm(b[:, None, :], x, W)
    else:
        out = torch.bmm(x, W).mul_(scale.unsqueeze(-1)).add_(b[:, None, :])
    return out.view(W.shape[0], N, P, W.shape[2]).permute(1, 2, 0, 3)


def rotate(arch: Arch, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on t [N, P, n, dh] with tables [P, rotary_dim]."""
    rd = arch.rotary_dim
    rot, rest = t[..., :rd], t[..., rd:]
    if arch.rotary_adjacent_pairs:
        a, b = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack((-b, a), dim=-1).flatten(-2)
    else:
        a, b = rot[..., : rd // 2], rot[..., rd // 2:]
        turned = torch.cat((-b, a), dim=-1)
    c, s = cos[:, None, :].to(t.dtype), sin[:, None, :].to(t.dtype)
    out = rot * c + turned * s
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def attend(arch: Arch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           key_valid: torch.Tensor | None = None, softmax_temperature: float = 1.0) -> torch.Tensor:
    """Attention (causal unless the arch says otherwise). q: [N, P, H, dh]; k, v: [N, P, KV, dh];
    key_valid: [N, P] bool, keys that may be attended (None: all). Returns z [N, P, H, dh].
    softmax_temperature ≠ 1: explicit attention whose softmax backward is tempered (GIM)."""
    rep = arch.n_heads // arch.n_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    mask = None
    P = q.shape[1]
    if key_valid is not None:
        mask = key_valid[:, None, None, :].expand(-1, 1, P, P)
        if arch.causal:
            mask = mask & torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
    if softmax_temperature != 1.0:
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / arch.attn_scale
        allowed = mask if mask is not None else (
            torch.ones(P, P, dtype=torch.bool, device=q.device).tril() if arch.causal else None)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = _SoftmaxTemperedBackward.apply(scores, float(softmax_temperature))
        return torch.einsum("bhqk,bkhe->bqhe", pattern, v)
    z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=arch.causal and mask is None,
                                       scale=1.0 / arch.attn_scale)
    return z.transpose(1, 2)


def attention_pattern(arch: Arch, q: torch.Tensor, k: torch.Tensor,
                      key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The attention weights `attend` uses, made explicit (for diagnostics, not the hot path).
    q: [N, P, H, dh]; k: [N, P, KV, dh] (rotated). Returns [N, H, P_query, P_key], rows sum to 1."""
    rep = arch.n_heads // arch.n_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
    scores = torch.einsum("nqhe,nkhe->nhqk", q, k) / arch.attn_scale
    P = q.shape[1]
    allowed = torch.ones(P, P, dtype=torch.bool, device=q.device)
    if arch.causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def head_outputs(lw: LayerWeights, z: torch.Tensor) -> torch.Tensor:
    """What each head writes to the residual stream (without the shared b_O): [N, P, H, d]."""
    return torch.einsum("bphe,hed->bphd", z, lw.W_O)


def mlp(arch: Arch, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """The MLP on its normalized input x [N, P, d]."""
    act = ACTIVATIONS[arch.act]
    pre = x @ lw.W_in
    if lw.b_in is not None:
        pre = pre + lw.b_in
    hidden = act(x @ lw.W_gate) * pre if lw.W_gate is not None else act(pre)
    out = hidden @ lw.W_out
    return out + lw.b_out if lw.b_out is not None else out

"""Per-architecture facts: turn a loaded model into an `Arch` and plain weight tensors.

The patching engine runs its own functional forward over these tensors (see `patching.py`), so
that per-head q/k/v receivers cost no residual-stream copies unless a mask needs them. Each
extractor reads one model family's module layout; `models.load` checks at run time that the
engine's forward reproduces the model's own logits before anything else runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from circuits.errors import CircuitsError


class Norm(Enum):
    LAYER = "layer"          # LayerNorm with gain and bias
    LAYER_PRE = "layer_pre"  # LayerNorm without parameters
    RMS = "rms"              # RMSNorm with gain
    RMS_PRE = "rms_pre"      # RMSNorm without parameters
    NONE = "none"


class Positional(Enum):
    LEARNED = "learned"
    ROTARY = "rotary"
    NONE = "none"


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class Arch:
    """Shape and wiring facts the graph and the engine need."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: Norm
    norm_eps: float
    positional: Positional
    rotary_dim: int = 0
    rotary_adjacent_pairs: bool = False  # TL-native RoPE rotates (2i, 2i+1); HF rotates halves
    parallel: bool = False               # attention and MLP both read the layer's input
    gated_mlp: bool = False
    act: str = "gelu_new"
    attn_only: bool = False
    attn_scale: float = 0.0              # scores are divided by this
    causal: bool = True                  # False: every position attends to every position
    pad_token_id: int | None = None      # keys holding this token are masked out (tracr's padding)

    @property
    def has_mlp(self) -> bool:
        return not self.attn_only

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads != self.n_heads


@dataclass
class LayerWeights:
    """One block. Shapes: W_Q [H, d, dh], W_K/W_V [KV, d, dh], W_O [H, dh, d], W_in [d, m]."""

    ln1: tuple[torch.Tensor | None, torch.Tensor | None]
    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    ln2: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    W_in: torch.Tensor | None = None
    b_in: torch.Tensor | None = None
    W_gate: torch.Tensor | None = None
    W_out: torch.Tensor | None = None
    b_out: torch.Tensor | None = None


@dataclass
class Weights:
    """All tensors of a model, in the engine's layout. rot_cos/rot_sin: [n_ctx, rotary_dim]."""

    arch: Arch
    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    layers: list[LayerWeights]
    ln_final: tuple[torch.Tensor | None, torch.Tensor | None]
    W_U: torch.Tensor
    b_U: torch.Tensor | None
    rot_cos: torch.Tensor | None = None
    rot_sin: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Weights":
        def move(t):
            if t is None:
                return None
            if isinstance(t, tuple):
                return tuple(move(x) for x in t)
            return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)

        layers = [LayerWeights(**{k: move(v) for k, v in vars(lw).items()}) for lw in self.layers]
        return Weights(self.arch, move(self.W_E), move(self.W_pos), layers, move(self.ln_final),
                       move(self.W_U), move(self.b_U), move(self.rot_cos), move(self.rot_sin),
                       dict(self.extra))

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype


class UnsupportedModel(CircuitsError, ValueError):
    """The engine cannot run this architecture; the message names what is missing."""


def _t(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def _norm_params(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return _t(getattr(module, "weight", None)), _t(getattr(module, "bias", None))


def _zeros(*shape, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*shape, dtype=like.dtype, device=like.device)


def _rotary_tables(rotary_module: nn.Module, n_ctx: int, like: torch.Tensor):
    """Ask the model's own rotary module for its cos/sin tables (handles every RoPE scaling)."""
    positions = torch.arange(n_ctx, device=like.device)[None]
    cos, sin = rotary_module(like.new_zeros(1, n_ctx, 1), positions)
    return cos[0].detach(), sin[0].detach()


def extract_gpt2(model: nn.Module) -> Weights:
    cfg = model.config
    tr = model.transformer
    H, d = cfg.n_head, cfg.n_embd
    dh = d // H
    layers = []
    for block in tr.h:
        W = block.attn.c_attn.weight.detach()  # Conv1D: [d, 3d], x @ W
        b = block.attn.c_attn.bias.detach()
        Wq, Wk, Wv = W.split(d, dim=1)
        bq, bk, bv = b.split(d)
        per_head = lambda w: w.reshape(d, H, dh).permute(1, 0, 2).contiguous()
        layers.append(LayerWeights(
            ln1=_norm_params(block.ln_1),
            W_Q=per_head(Wq), b_Q=bq.reshape(H, dh), W_K=per_head(Wk), b_K=bk.reshape(H, dh),
            W_V=per_head(Wv), b_V=bv.reshape(H, dh),
            W_O=block.attn.c_proj.weight.detach().reshape(H, dh, d), b_O=block.attn.c_proj.bias.detach(),
            ln2=_norm_params(block.ln_2),
            W_in=block.mlp.c_fc.weight.detach(), b_in=block.mlp.c_fc.bias.detach(),
            W_out=block.mlp.c_proj.weight.detach(), b_out=block.mlp.c_proj.bias.detach(),
        ))
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        raise UnsupportedModel("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                               "reorder_and_upcast_attn are not supported")
    arch = Arch(
        family="gpt2", n_layers=cfg.n_layer, n_heads=H, n_kv_heads=H, d_model=d, d_head=dh,
        d_mlp=layers[0].W_in.shape[1], d_vocab=cfg.vocab_size, n_ctx=cfg.n_positions,
        norm=Norm.LAYER, norm_eps=cfg.layer_norm_epsilon, positional=Positional.LEARNED,
        act=cfg.activation_function, attn_scale=math.sqrt(dh) if cfg.scale_attn_weights else 1.0,
    )
    W_U = model.get_output_embeddings().weight.detach().T
    return Weights(arch, tr.wte.weight.detach(), tr.wpe.weight.detach(), layers,
                   _norm_params(tr.ln_f), W_U, None)


def extract_neox(model: nn.Module) -> Weights:
    cfg = model.config
    base = model.gpt_neox
    H, d = cfg.num_attention_heads, cfg.hidden_size
    dh = d // H
    layers = []
    for block in base.layers:
        qkv_w = block.attention.query_key_value.weight.detach().reshape(H, 3, dh, d)
        qkv_b = block.attention.query_key_value.bias.detach().reshape(H, 3, dh)
        dense = block.attention.dense
        layers.append(LayerWeights(
            ln1=_norm_params(block.input_layernorm),
            W_Q=qkv_w[:, 0].transpose(1, 2).contiguous(), b_Q=qkv_b[:, 0].contiguous(),
            W_K=qkv_w[:, 1].transpose(1, 2).contiguous(), b_K=qkv_b[:, 1].contiguous(),
            W_V=qkv_w[:, 2].transpose(1, 2).contiguous(), b_V=qkv_b[:, 2].contiguous(),
            W_O=dense.weight.detach().T.reshape(H, dh, d).contiguous(), b_O=dense.bias.detach(),
            ln2=_norm_params(block.post_attention_layernorm),
            W_in=block.mlp.dense_h_to_4h.weight.detach().T.contiguous(),
            b_in=block.mlp.dense_h_to_4h.bias.detach(),
            W_out=block.mlp.dense_4h_to_h.weight.detach().T.contiguous(),
            b_out=block.mlp.dense_4h_to_h.bias.detach(),
        ))
    cos, sin = _rotary_tables(base.rotary_emb, cfg.max_position_embeddings, layers[0].W_Q)
    arch = Arch(
        family="neox", n_layers=cfg.num_hidden_layers, n_heads=H, n_kv_heads=H, d_model=d,
        d_head=dh, d_mlp=cfg.intermediate_size, d_vocab=cfg.vocab_size,
        n_ctx=cfg.max_position_embeddings, norm=Norm.LAYER, norm_eps=cfg.layer_norm_eps,
        positional=Positional.ROTARY, rotary_dim=cos.shape[-1],
        parallel=bool(cfg.use_parallel_residual), act=cfg.hidden_act, attn_scale=math.sqrt(dh),
    )
    W_U = model.get_output_embeddings().weight.detach().T
    return Weights(arch, base.embed_in.weight.detach(), None, layers,
                   _norm_params(base.final_layer_norm), W_U, None, cos, sin)


def extract_llama(model: nn.Module) -> Weights:
    cfg = model.config
    base = model.model
    H, d = cfg.num_attention_heads, cfg.hidden_size
    KV = cfg.num_key_value_heads or H
    dh = getattr(cfg, "head_dim", None) or d // H
    layers = []
    for block in base.layers:
        at, mlp = block.self_attn, block.mlp
        heads = lambda lin, n: lin.weight.detach().reshape(n, dh, d).transpose(1, 2).contiguous()
        bias = lambda lin, n: (lin.bias.detach().reshape(n, dh) if lin.bias is not None
                               else _zeros(n, dh, like=lin.weight))
        layers.append(LayerWeights(
            ln1=_norm_params(block.input_layernorm),
            W_Q=heads(at.q_proj, H), b_Q=bias(at.q_proj, H),
            W_K=heads(at.k_proj, KV), b_K=bias(at.k_proj, KV),
            W_V=heads(at.v_proj, KV), b_V=bias(at.v_proj, KV),
            W_O=at.o_proj.weight.detach().T.reshape(H, dh, d).contiguous(),
            b_O=_t(at.o_proj.bias) if at.o_proj.bias is not None else _zeros(d, like=at.o_proj.weight),
            ln2=_norm_params(block.post_attention_layernorm),
            W_gate=mlp.gate_proj.weight.detach().T.contiguous(),
            W_in=mlp.up_proj.weight.detach().T.contiguous(), b_in=_t(mlp.up_proj.bias),
            W_out=mlp.down_proj.weight.detach().T.contiguous(), b_out=_t(mlp.down_proj.bias),
        ))
    cos, sin = _rotary_tables(base.rotary_emb, cfg.max_position_embeddings, layers[0].W_Q)
    arch = Arch(
        family="llama", n_layers=cfg.num_hidden_layers, n_heads=H, n_kv_heads=KV, d_model=d,
        d_head=dh, d_mlp=cfg.intermediate_size, d_vocab=cfg.vocab_size,
        n_ctx=cfg.max_position_embeddings, norm=Norm.RMS, norm_eps=cfg.rms_norm_eps,
        positional=Positional.ROTARY, rotary_dim=cos.shape[-1], gated_mlp=True,
        act=cfg.hidden_act, attn_scale=1.0 / at.scaling,
    )
    W_U = model.get_output_embeddings().weight.detach().T
    return Weights(arch, base.embed_tokens.weight.detach(), None, layers,
                   _norm_params(base.norm), W_U, None, cos, sin)


def extract_native(model: nn.Module) -> Weights:
    """TransformerLens' own native model (`boot_native`), which exposes no per-head hooks."""
    cfg = model.cfg
    H, KV = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    d, dh = cfg.d_model, cfg.d_head
    norm_kind = (cfg.normalization_type or "NONE").upper()
    norm = {"LN": Norm.LAYER, "LNPRE": Norm.LAYER_PRE, "RMS": Norm.RMS, "RMSPRE": Norm.RMS_PRE,
            "NONE": Norm.NONE}.get(norm_kind)
    if norm is None:
        raise UnsupportedModel(f"native model normalization {cfg.normalization_type!r} is not supported")
    if getattr(cfg, "final_rms", False) and norm not in (Norm.RMS, Norm.RMS_PRE):
        raise UnsupportedModel("native models with final_rms on a non-RMS model are not supported")
    if float(getattr(cfg, "attn_scores_soft_cap", -1.0)) > 0 or float(getattr(cfg, "output_logits_soft_cap", -1.0)) > 0:
        raise UnsupportedModel("soft-capped attention or logits are not supported")
    layers = []
    for block in model.layers:
        at = block.attn
        heads = lambda lin, n: lin.weight.detach().reshape(n, dh, d).transpose(1, 2).contiguous()
        mlp = getattr(block, "mlp", None)
        lw = LayerWeights(
            ln1=_norm_params(block.ln1),
            W_Q=heads(at.q, H), b_Q=at.q.bias.detach().reshape(H, dh),
            W_K=heads(at.k, KV), b_K=at.k.bias.detach().reshape(KV, dh),
            W_V=heads(at.v, KV), b_V=at.v.bias.detach().reshape(KV, dh),
            W_O=at.o.weight.detach().T.reshape(H, dh, d).contiguous(), b_O=at.o.bias.detach(),
        )
        if mlp is not None:
            if getattr(mlp, "ln", None) is not None:
                raise UnsupportedModel("SoLU-LN MLPs are not supported")
            lw.ln2 = _norm_params(block.ln2)
            if hasattr(mlp, "gate"):
                lw.W_gate = mlp.gate.weight.detach().T.contiguous()
                lw.W_in = getattr(mlp, "in").weight.detach().T.contiguous()
                lw.W_out = mlp.out.weight.detach().T.contiguous()
            else:
                lw.W_in, lw.b_in = mlp.fc_in.weight.detach().T.contiguous(), mlp.fc_in.bias.detach()
                lw.W_out, lw.b_out = mlp.fc_out.weight.detach().T.contiguous(), mlp.fc_out.bias.detach()
        layers.append(lw)
    cos = sin = None
    if model.rotary is not None:
        cos, sin = model.rotary.cos_cached.detach(), model.rotary.sin_cached.detach()
    act = (cfg.act_fn or ("silu" if cfg.gated_mlp else "gelu")).lower()
    if act not in ACTIVATIONS:
        raise UnsupportedModel(f"activation {act!r} is not supported")
    arch = Arch(
        family="native", n_layers=cfg.n_layers, n_heads=H, n_kv_heads=KV, d_model=d, d_head=dh,
        d_mlp=(cfg.d_mlp or 4 * d) if not cfg.attn_only else 0, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
        norm=norm, norm_eps=cfg.eps,
        positional=Positional.ROTARY if model.rotary is not None else (
            Positional.LEARNED if model.pos is not None else Positional.NONE),
        rotary_dim=0 if cos is None else cos.shape[-1], rotary_adjacent_pairs=True,
        gated_mlp=bool(cfg.gated_mlp), act=act, attn_only=bool(cfg.attn_only),
        attn_scale=float(model.layers[0].attn.scale), causal=bool(model.layers[0].attn.causal),
    )
    W_pos = model.pos.weight.detach() if model.pos is not None else None
    return Weights(arch, model.tok_embed.weight.detach(), W_pos, layers,
                   _norm_params(model.ln_out), model.head.weight.detach().T, None, cos, sin)


EXTRACTORS: dict[str, Callable[[nn.Module], Weights]] = {
    "GPT2LMHeadModel": extract_gpt2,
    "GPTNeoXForCausalLM": extract_neox,
    "LlamaForCausalLM": extract_llama,
    "NativeModel": extract_native,
}


def extract(model: nn.Module) -> Weights:
    name = type(model).__name__
    if name not in EXTRACTORS:
        raise UnsupportedModel(
            f"architecture {name} is not supported: the engine knows "
            f"{', '.join(sorted(EXTRACTORS))}. Missing: a weight extractor in circuits/adapters.py")
    return EXTRACTORS[name](model)

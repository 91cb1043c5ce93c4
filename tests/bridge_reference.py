"""An independent reference: patching through TransformerLens bridge hooks (slow, simple).

Used only by tests, to check the engine's fused forward against TL's own hook points.
"""

import torch

from circuits.model.adapters import Positional
from circuits.patching import Ablation


def _cache(bridge, tokens, names):
    store = {}

    def keeper(name):
        def keep(t, hook):
            store[name] = t.detach().clone()
            return t
        return keep

    with torch.no_grad():
        bridge.run_with_hooks(tokens, fwd_hooks=[(n, keeper(n)) for n in names])
    return store


def _ablate_value(values, ablation, valid):
    """values: [B, P, ...] from the reference run → the ablated value broadcastable to it."""
    if ablation is Ablation.RESAMPLE:
        return values
    if ablation is Ablation.ZERO:
        return torch.zeros_like(values[:1, :1])
    w = valid.to(values.dtype).view(*valid.shape, *([1] * (values.dim() - 2)))
    if ablation is Ablation.MEAN:
        return ((values * w).sum((0, 1)) / w.sum((0, 1)))[None, None]
    return ((values * w).sum(0) / w.sum(0))[None]


def node_patched_logits(model, node, clean, corrupted, ablation, valid):
    """Logits with one node's output replaced by its ablated value, via bridge hooks."""
    bridge, arch = model.bridge, model.arch
    if node == "input":
        names = ["hook_embed"] + (["hook_pos_embed"] if arch.positional is Positional.LEARNED else [])
    elif node.startswith("a"):
        layer, head = (int(x) for x in node[1:].split(".h"))
        names = [f"blocks.{layer}.attn.hook_z"]
    else:
        names = [f"blocks.{int(node[1:])}.hook_mlp_out"]
    ref = _cache(bridge, corrupted, names)
    hooks = []
    for name in names:
        value = _ablate_value(ref[name], ablation, valid)

        def patch(t, hook, value=value):
            t = t.clone()
            if node.startswith("a"):
                t[:, :, head] = value[:, :, head].expand_as(t[:, :, head])
            else:
                t[:] = value.expand_as(t)
            return t
        hooks.append((name, patch))
    with torch.no_grad():
        return bridge.run_with_hooks(clean, fwd_hooks=hooks)


def receiver_fed_corrupted_logits(model, hook_name, index, clean, corrupted):
    """Logits when one receiver reads the corrupted run's input (index: head/KV head or None)."""
    bridge = model.bridge
    split = "_input" in hook_name
    if split:
        bridge.set_use_split_qkv_input(True)
    try:
        ref = _cache(bridge, corrupted, [hook_name])[hook_name]

        def patch(t, hook):
            t = t.clone()
            if index is None:
                t[:] = ref
            else:
                t[:, :, index] = ref[:, :, index]
            return t
        with torch.no_grad():
            return bridge.run_with_hooks(clean, fwd_hooks=[(hook_name, patch)])
    finally:
        if split:
            bridge.set_use_split_qkv_input(False)

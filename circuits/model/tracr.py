"""RASP programs compiled by tracr, as models the engine runs, with their ground-truth circuits.

Compiling needs the optional `tracr` extra (`tracr-pypi`, which pulls jax); loading the shipped
models (`circuits/builtin/tracr-*`) does not: they are TransformerLens-native models
(no normalisation, ReLU MLPs, bidirectional attention for programs that read later positions)
stored as safetensors plus a meta.json that records the residual-stream labels, the program's
reference outputs and the ground truth.

Ground truth, per ablation. tracr gives every SOp its own residual directions, so an edge can
only matter if its sender writes a direction its receiver reads (`structural_mask`, read off the
weights). The ground truth keeps the structural edges whose ablation alone changes the output
on some example of the recorded dataset (`ground_truth`); the whole set then reproduces the
model exactly. Zero ablation (the ACDC paper's setting) keeps everything the program computes
with, including tracr's constant `one` direction; resample ablation with same-length
corruptions drops what the clean and corrupted inputs share (the length computation, indices),
so the two ground truths differ. meta.json ships both, and the SOps each edge carries.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = "tl-native"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Program:
    name: str
    description: str
    vocab: tuple                 # input values (BOS and pad are added by tracr)
    max_seq_len: int
    causal: bool
    categorical: bool            # categorical output (KL metric) or numerical (MSE metric)
    build: Callable[[], Any]     # () -> rasp.SOp; imports tracr lazily
    reference: Callable[[list[str]], Any]  # the output at the last position, in Python (no tracr)
    distinct: bool = False       # inputs use distinct values (sort_unique needs them)


def _reverse():
    from tracr.compiler import lib
    from tracr.rasp import rasp
    length = lib.make_length()
    opp_idx = (length - rasp.indices).named("opp_idx")
    opp_idx = (opp_idx - 1).named("opp_idx-1")
    select = rasp.Select(rasp.indices, opp_idx, rasp.Comparison.EQ)
    return rasp.Aggregate(select, rasp.tokens).named("reverse")


def _proportion():
    from tracr.compiler import lib
    from tracr.rasp import rasp
    is_x = rasp.numerical(rasp.Map(lambda t: 1 if t == "x" else 0, rasp.tokens)).named("is_x")
    return lib.make_frac_prevs(is_x).named("frac_x")


def _sort():
    from tracr.compiler import lib
    from tracr.rasp import rasp
    return lib.make_sort_unique(rasp.tokens, rasp.tokens).named("sort")


PROGRAMS: dict[str, Program] = {
    "reverse": Program("reverse", "reverse the input sequence (the ACDC paper's tracr-reverse)",
                       ("a", "b", "c"), 5, False, True, _reverse, lambda xs: xs[0]),
    "proportion": Program("proportion", "fraction of 'x' tokens so far (the ACDC paper's tracr-proportion)",
                          ("w", "x", "y", "z"), 5, True, False, _proportion,
                          lambda xs: sum(t == "x" for t in xs) / len(xs)),
    "sort": Program("sort", "sort distinct numbers ascending (tracr's make_sort_unique)",
                    (1, 2, 3, 4, 5, 6), 5, False, True, _sort, lambda xs: max(xs, key=float), distinct=True),
}


# ---- compiling and converting (needs tracr) --------------------------------------------------

def compile_program(name: str):
    """Compile a registered RASP program with tracr: (tracr's assembled model, output SOp label)."""
    try:
        from tracr.compiler import compiling
    except ImportError as err:
        raise ImportError("compiling RASP programs needs the optional extra: "
                          "pip install 'circuits[tracr]' (tracr-pypi, jax)") from err
    p = PROGRAMS[name]
    sop = p.build()
    assembled = compiling.compile_rasp_to_model(sop, vocab=set(p.vocab), max_seq_len=p.max_seq_len,
                                                compiler_bos="BOS", compiler_pad="PAD", causal=p.causal)
    return assembled, sop.label


def convert(assembled, program: Program, out_sop: str) -> tuple[dict, dict[str, np.ndarray], dict]:
    """tracr model → (TL-native config, state dict of float32 arrays, metadata)."""
    P = {k: {kk: np.asarray(vv, dtype=np.float32) for kk, vv in v.items()} for k, v in assembled.params.items()}
    cfg_t = assembled.model_config
    labels = list(assembled.residual_labels)
    d, H, dh = len(labels), cfg_t.num_heads, cfg_t.key_size
    out_enc = assembled.output_encoder
    tok_embed = P["token_embed"]["embeddings"]
    cfg = {"n_layers": cfg_t.num_layers, "d_model": d, "n_heads": H, "d_head": dh,
           "d_mlp": cfg_t.mlp_hidden_size, "d_vocab": tok_embed.shape[0], "n_ctx": program.max_seq_len + 1,
           "normalization_type": None, "act_fn": "relu", "positional_embedding_type": "standard",
           "attention_dir": "causal" if program.causal else "bidirectional", "init_weights": False}
    state = {"tok_embed.weight": tok_embed, "pos.weight": P["pos_embed"]["embeddings"]}
    for layer in range(cfg_t.num_layers):
        pre = f"transformer/layer_{layer}"
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "linear")):
            state[f"layers.{layer}.attn.{ours}.weight"] = P[f"{pre}/attn/{theirs}"]["w"].T.copy()
            state[f"layers.{layer}.attn.{ours}.bias"] = P[f"{pre}/attn/{theirs}"]["b"]
        for ours, theirs in (("fc_in", "linear_1"), ("fc_out", "linear_2")):
            state[f"layers.{layer}.mlp.{ours}.weight"] = P[f"{pre}/mlp/{theirs}"]["w"].T.copy()
            state[f"layers.{layer}.mlp.{ours}.bias"] = P[f"{pre}/mlp/{theirs}"]["b"]
    # Unembedding: tracr projects the residual onto the output SOp's directions.
    if program.categorical:
        values = sorted(out_enc.encoding_map, key=out_enc.encoding_map.get)
        head = np.zeros((len(values), d), dtype=np.float32)
        for v in values:
            head[out_enc.encoding_map[v], labels.index(f"{out_sop}:{v}")] = 1.0
        output_vocab = [str(v) for v in values]
    else:
        head = np.zeros((1, d), dtype=np.float32)
        head[0, labels.index(out_sop)] = 1.0
        output_vocab = [out_sop]
    state["head.weight"] = head
    cfg["d_vocab_out"] = head.shape[0]
    in_enc = assembled.input_encoder
    input_vocab = [str(v) for v in sorted(in_enc.encoding_map, key=in_enc.encoding_map.get)]
    meta = {"name": f"tracr-{program.name}", "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "description": f"tracr-compiled RASP program: {program.description}. "
                           f"Input: BOS then up to {program.max_seq_len} values from {list(program.vocab)}.",
            "native_config": cfg, "tracr": {
                "program": program.name, "residual_labels": labels, "output_sop": out_sop,
                "input_vocab": input_vocab, "output_vocab": output_vocab, "categorical": program.categorical,
                "bos": "BOS", "pad": "PAD", "max_seq_len": program.max_seq_len, "causal": program.causal}}
    return cfg, state, meta


def reference_examples(assembled, program: Program, out_sop: str, n: int = 16, seed: int = 0) -> list[dict]:
    """Inputs and tracr's own outputs (decoded, and raw at the last position), for load-time checks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        xs = sample(program, rng, program.max_seq_len)
        res = assembled.apply(["BOS"] + xs)
        final = np.asarray(res.transformer_output)[0, -1]
        labels = list(assembled.residual_labels)
        raw = [float(final[i]) for i, lab in enumerate(labels) if lab.split(":")[0] == out_sop]
        out.append({"input": [str(x) for x in xs], "decoded": [str(v) for v in res.decoded[1:]],
                    "last_raw": raw})
    return out


def sample(program: Program, rng: random.Random, length: int, vocab: list | None = None) -> list:
    vocab = list(program.vocab) if vocab is None else vocab
    if program.distinct:
        return rng.sample(vocab, length)
    return [rng.choice(vocab) for _ in range(length)]


def save(directory: str | Path, cfg: dict, state: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save_file

    from circuits import files
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(directory / "model.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    (directory / "model.safetensors").chmod(0o644)
    files.write_text(directory / "meta.json", json.dumps(meta, indent=1) + "\n")


# ---- loading (no tracr needed) ---------------------------------------------------------------

def load_native(path: Path, meta: dict, dtype=None):
    """A shipped TL-native model: the unwrapped `NativeModel` with its weights loaded."""
    from safetensors.torch import load_file
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native.model import NativeModel
    cfg = TransformerBridgeConfig.from_dict(dict(meta["native_config"]))
    module = NativeModel(cfg)
    state = load_file(str(path / "model.safetensors"))
    module.load_state_dict(state, strict=True)
    if dtype is not None:
        module = module.to(dtype=dtype)
    return module, cfg


class VocabTokenizer:
    """A whitespace tokenizer over a fixed vocabulary (tracr models take one value per token)."""

    def __init__(self, vocab: list[str], bos: str | None = None, pad: str | None = None):
        self.vocab = list(vocab)
        self.index = {v: i for i, v in enumerate(self.vocab)}
        self.bos_token_id = self.index.get(bos) if bos else None
        self.eos_token_id = None
        self.pad_token_id = self.index.get(pad) if pad else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        unknown = [t for t in text.split() if t not in self.index]
        if unknown:
            raise ValueError(f"tokens {unknown} are not in this model's vocabulary {self.vocab}")
        return [self.index[t] for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": self.encode(text)}

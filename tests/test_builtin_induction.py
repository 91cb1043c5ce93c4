"""Checks on the shipped builtin model circuits/builtin/induction-2l.

The weights are produced by tasks/train_induction.py; these tests load them with
plain transformers and verify induction behaviour on fresh data.
"""
from __future__ import annotations

import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "circuits" / "builtin" / "induction-2l"
VOCAB = 64
BOS = 0


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = transformers.GPT2LMHeadModel.from_pretrained(MODEL_DIR, attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="module")
def meta():
    return json.loads((MODEL_DIR / "meta.json").read_text())


def repeated(n: int, length: int, seed: int) -> torch.Tensor:
    """[BOS] + r + r, r = `length` distinct tokens from 1..63."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(n, VOCAB - 1, generator=gen).argsort(dim=1)[:, :length] + 1
    return torch.cat([torch.full((n, 1), BOS, dtype=torch.long), r, r], dim=1)


def parse_head(name: str) -> tuple[int, int]:
    layer, head = name.split(".")
    assert layer[0] == "a" and head[0] == "h", name
    return int(layer[1:]), int(head[1:])


def test_files_present_and_small():
    for f in ("config.json", "model.safetensors", "meta.json"):
        p = MODEL_DIR / f
        assert p.is_file(), p
        assert p.stat().st_size < 1_000_000, p


@pytest.mark.parametrize("length", [8, 12, 15])
def test_repeated_half_accuracy(model, length):
    x = repeated(64, length, seed=1234 + length)
    with torch.no_grad():
        logits = model(x).logits
    # positions L+1..2L-1 predict the second copy's tokens r[1:] (its first token is unpredictable)
    pred = logits[:, length + 1:2 * length].argmax(-1)
    target = x[:, length + 2:2 * length + 1]
    acc = (pred == target).float().mean().item()
    assert acc >= 0.9, f"L={length}: accuracy {acc:.3f}"


def test_meta_heads(meta, model):
    assert meta["name"] == "induction-2l"
    assert meta["bos_token_id"] == BOS
    assert meta["content_tokens"] == [1, VOCAB - 1]
    prev, ind = meta["previous_token_heads"], meta["induction_heads"]
    assert prev and ind
    cfg = model.config
    for name in prev + ind:
        layer, head = parse_head(name)
        assert 0 <= layer < cfg.n_layer and 0 <= head < cfg.n_head
    assert all(parse_head(n)[0] == 0 for n in prev)
    assert all(parse_head(n)[0] == 1 for n in ind)


def test_heads_attention_patterns(meta, model):
    length = 12
    x = repeated(64, length, seed=99)
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions  # per layer [B, H, T, T]
    T = x.shape[1]
    i = torch.arange(1, T)
    for name in meta["previous_token_heads"]:
        layer, head = parse_head(name)
        score = att[layer][:, head, i, i - 1].mean().item()
        assert score > 0.5, f"{name}: previous-token score {score:.3f}"
    q = torch.arange(length + 1, 2 * length + 1)  # second-copy positions
    for name in meta["induction_heads"]:
        layer, head = parse_head(name)
        score = att[layer][:, head, q, q - length + 1].mean().item()
        assert score > 0.5, f"{name}: induction score {score:.3f}"

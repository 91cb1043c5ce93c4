"""Checks on the shipped builtin model circuits/builtin/ioi-3l.

The weights are produced by tasks/train_ioi.py (GPT-2 vocabulary, trained on templated IOI
prompts); these tests load them through `circuits.model.loader` and check that they solve the built-in
`ioi` task on fresh prompts, that the checkpoint stays small, that the mechanism recorded in
meta.json holds, and that the default discovery finds a small faithful circuit.
"""
from __future__ import annotations

import gzip
import json
import pathlib

import pytest
import torch
from conftest import load_model

from circuits import discover, evaluation
from circuits.discover import Selection
from circuits.tasks import builtin

MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "circuits" / "builtin" / "ioi-3l"


@pytest.fixture(scope="module")
def model():
    return load_model("ioi-3l")


@pytest.fixture(scope="module")
def meta():
    return json.loads((MODEL_DIR / "meta.json").read_text())


def task(model, n=200, seed=123):
    return builtin.build_task("ioi", model, n=n, seed=seed)


def logit_diffs(model, t) -> torch.Tensor:
    """logit(IO) - logit(S) at each prompt's last position (the task's answer vs wrong token)."""
    return evaluation.prepare(model, t).clean_metric()


def test_files_present_and_compressible():
    for f in ("config.json", "model.safetensors", "meta.json"):
        assert (MODEL_DIR / f).is_file(), f
    raw = (MODEL_DIR / "model.safetensors").read_bytes()
    assert len(gzip.compress(raw, compresslevel=1)) < 1_000_000


def test_loads_with_gpt2_tokenizer(model):
    assert model.arch.d_vocab == 50257
    assert model.tokenizer is not None and model.tokenizer.encode(" Mary") == [5335]
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["model_type"] == "gpt2"


def test_unused_embedding_rows_are_exactly_zero(meta):
    from safetensors.torch import load_file
    wte = load_file(MODEL_DIR / "model.safetensors")["transformer.wte.weight"]
    nonzero = int((wte != 0).any(1).sum())
    assert nonzero == meta["used_tokens"] <= 100


@pytest.mark.parametrize("seed", [123, 0, 7])
def test_solves_builtin_ioi(model, seed):
    t = task(model, n=200, seed=seed)
    assert len(t) >= 100
    ld = logit_diffs(model, t)
    acc = (ld > 0).float().mean().item()
    assert acc >= 0.9, f"seed {seed}: accuracy {acc:.3f}"
    assert ld.mean().item() > 5


def test_corruption_removes_the_preference(model):
    t = task(model, n=200, seed=123)
    setup = evaluation.prepare(model, t)
    clean = setup.clean_metric().mean().item()
    empty = setup.metric(setup.graph.empty_mask()).mean().item()
    assert abs(empty) < 0.2 * clean


def attention_end_to_s2(t, head: str) -> float:
    """Mean attention of `head` from the last position to the second mention of S (measured with
    the Hugging Face model itself, not read back from meta.json)."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    layer, h = (int(x) for x in head[1:].split(".h"))
    with torch.no_grad():
        att = hf(t.clean, attention_mask=t.valid.long(), output_attentions=True).attentions[layer][:, h]
    weights = []
    for b in range(len(t)):
        end = int(t.lengths[b]) - 1
        s2 = max(i for i in range(end) if int(t.clean[b, i]) == int(t.wrongs[b, 0]))
        weights.append(att[b, end, s2].item())
    return sum(weights) / len(weights)


def test_heldout_name_pairs_are_solved(model, meta):
    """Name pairs never seen in training (meta.json lists them) are solved too."""
    held = {frozenset(n.strip() for n in pair.split("/")) for pair in meta["training_format"]["heldout_name_pairs"]}
    tok = model.tokenizer
    diffs = []
    for seed in (0, 1, 2, 3, 123):
        t = task(model, n=200, seed=seed)
        rows = [b for b in range(len(t)) if frozenset(
            (tok.decode([int(t.answers[b, 0])]).strip(), tok.decode([int(t.wrongs[b, 0])]).strip())) in held]
        if rows:
            diffs.append(logit_diffs(model, t.subset(rows)))
    diffs = torch.cat(diffs)
    assert len(diffs) >= 20 and (diffs > 0).float().mean().item() >= 0.9


def test_meta_mechanism_holds(model, meta):
    """The S-suppression head attends from the last position to S2; ablating it kills the logit diff."""
    assert meta["s_suppression_heads"] and meta["name_mover_heads"]
    assert meta["duplicate_token_heads"] == []
    t = task(model, n=64, seed=5)
    setup = evaluation.prepare(model, t)
    g = setup.graph
    clean = setup.clean_metric().mean().item()
    for head in meta["s_suppression_heads"]:
        assert attention_end_to_s2(t, head) > 0.9, head
        mask = g.full_mask().clone()
        mask[g.sender_index[head], :] = False          # all of the head's outgoing edges ablated
        assert setup.metric(mask).mean().item() < 0.2 * clean, head


def test_default_discovery_is_small_and_faithful(model):
    setup = evaluation.prepare(model, task(model, n=64, seed=0))
    found = discover.run(setup, "eap-ig-activations", selection=Selection(target_faithfulness=0.8))
    c = found.circuit
    assert found.faithfulness["faithfulness"] >= 0.8
    assert c.n_edges <= 0.1 * model.graph.n_edges, c.n_edges
    assert set(model.meta["s_suppression_heads"]) <= set(c.node_names())

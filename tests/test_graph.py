import json

import pytest
import torch
from conftest import load_model

from circuits import graph
from circuits.cli.main import main
from circuits.model.adapters import Arch, Norm, Positional


def arch(**kw):
    base = dict(family="gpt2", n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64,
                d_mlp=3072, d_vocab=50257, n_ctx=1024, norm=Norm.LAYER, norm_eps=1e-5,
                positional=Positional.LEARNED)
    base.update(kw)
    return Arch(**base)


def test_gpt2_small_has_32491_edges():
    assert graph.build(arch()).n_edges == 32491


def test_parallel_attention_drops_same_layer_head_to_mlp_edges():
    # L layers, H heads: senders before layer l: 1 + l(H+1).
    # q/k/v: 3H(1 + l(H+1)); MLP: 1 + l(H+1) (parallel) or + H (sequential); logits: 1 + L(H+1).
    L, H = 6, 8
    attn = sum(3 * H * (1 + l * (H + 1)) for l in range(L))
    mlp = sum(1 + l * (H + 1) for l in range(L))
    logits = 1 + L * (H + 1)
    g = graph.build(arch(n_layers=L, n_heads=H, n_kv_heads=H, parallel=True))
    assert g.n_edges == attn + mlp + logits == 3580
    g_seq = graph.build(arch(n_layers=L, n_heads=H, n_kv_heads=H, parallel=False))
    assert g_seq.n_edges == g.n_edges + L * H


def test_grouped_query_attention_has_kv_receivers_per_kv_head():
    L, H, KV = 4, 8, 2
    per_layer_recv = H + 2 * KV
    attn = sum(per_layer_recv * (1 + l * (H + 1)) for l in range(L))
    mlp = sum(1 + l * (H + 1) + H for l in range(L))
    logits = 1 + L * (H + 1)
    g = graph.build(arch(family="llama", n_layers=L, n_heads=H, n_kv_heads=KV))
    assert g.n_edges == attn + mlp + logits == 823
    assert "a3.kv1<k>" in g.receiver_index and "a3.h7<q>" in g.receiver_index
    assert g.receiver_nodes(g.receiver_index["a1.kv1<v>"]) == [g.sender_index[f"a1.h{h}"] for h in (4, 5, 6, 7)]


def test_names_follow_mib_convention():
    g = graph.build(arch(n_layers=2, n_heads=2, n_kv_heads=2))
    assert g.edge("input->a0.h0<q>") == (0, 0)
    assert g.edge_name(*g.edge("a0.h1->m0")) == "a0.h1->m0"
    assert g.edge_name(*g.edge("m1->logits")) == "m1->logits"
    import pytest
    with pytest.raises(KeyError, match="does not run before"):
        g.edge("m1->a0.h0<q>")


def test_node_view_round_trip():
    g = graph.build(arch(n_layers=2, n_heads=2, n_kv_heads=2))
    mask = g.mask_from_edges(["input->a0.h0<q>", "a0.h0->m1", "m1->logits"])
    nodes = g.node_mask(mask)
    assert [n for n, k in zip(g.nodes, nodes.tolist()) if k] == ["input", "a0.h0", "m1", "logits"]
    assert (g.edges_of_nodes(nodes) & mask).sum() == 3


def test_cli_graph_reports_counts(capsys):
    assert main(["graph", "random:gpt2-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["edges"]["total"] == load_model("random:gpt2-tiny").graph.n_edges == 110


def test_cli_graph_gpt2_small(capsys):
    assert main(["graph", "random:gpt2-small", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edges"]["total"] == 32491


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny",
                                  "random:native-tiny"])
def test_architecture_without_weights_equals_the_loaded_one(spec):
    from circuits.model import loader
    assert loader.architecture(spec) == loader.load(spec, check=False).arch


def test_the_gpt2_tokenizer_is_cached_and_a_damaged_cache_rebuilt(tmp_path, monkeypatch):
    from circuits.model import loader
    monkeypatch.setenv("CIRCUITS_CACHE_DIR", str(tmp_path))
    loader.gpt2_tokenizer.cache_clear()
    try:
        ids = loader.gpt2_tokenizer().encode(" Mary and John")
        (cached,) = tmp_path.glob("gpt2-tokenizer-*.json")
        loader.gpt2_tokenizer.cache_clear()
        assert loader.gpt2_tokenizer().encode(" Mary and John") == ids          # read from the cache
        cached.write_text("{ not a tokenizer")
        loader.gpt2_tokenizer.cache_clear()
        assert loader.gpt2_tokenizer().encode(" Mary and John") == ids == [5335, 290, 1757]
        assert cached.read_text().startswith("{") and "model" in cached.read_text()   # rebuilt
    finally:
        loader.gpt2_tokenizer.cache_clear()


def test_the_bridge_is_built_on_first_use():
    from circuits.model import loader
    model = loader.load("random:gpt2-tiny")
    assert "bridge" not in vars(model)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(model.bridge(tokens), model.source(tokens).logits, atol=1e-5)

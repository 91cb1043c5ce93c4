"""Position-aware edges and neuron masks: the same patching mechanism at finer grains."""

import json

import pytest
import torch
from conftest import TINY, load_model, random_task

from circuits import circuit as circuit_io
from circuits import discover, evaluation, methods, patching, positions, select
from circuits.graph import build
from circuits.io import formats
from circuits.methods.acdc import acdc
from circuits.methods.attribution import attribute
from circuits.model.adapters import Arch, Norm, Positional
from circuits.patching import Ablation
from circuits.positions import PositionError, TokenGroups
from circuits.tasks.files import load_file
from circuits.tasks.task import TaskError, from_pairs

ABLATIONS = list(Ablation)
GRADIENT = ["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted", "eap-gim"]


def labelled_task(model, n=6, length=8, seed=2):
    """Rows of different lengths whose positions are named: A (token 1), B (token 3), END (last)."""
    task = random_task(model, n=n, length=length, seed=seed, vary_lengths=True)
    index = torch.stack([torch.ones(n, dtype=torch.long), torch.full((n,), 3), task.lengths - 1], 1)
    return from_pairs("labelled", [c[:k].tolist() for c, k in zip(task.clean, task.lengths)],
                      [c[:k].tolist() for c, k in zip(task.corrupted, task.lengths)],
                      task.answers.tolist(), task.wrongs.tolist(),
                      position_names=("A", "B", "END"), position_index=index)


def setups(model, task, ablation):
    plain = evaluation.prepare(model, task, ablation)
    return plain, evaluation.prepare(model, task, ablation, positions=positions.of_task(task))


# ---- the graph at position grain ---------------------------------------------------------------

def test_gpt2_small_has_519856_position_edges():
    arch = Arch(family="gpt2", n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64, d_mlp=3072,
                d_vocab=50257, n_ctx=1024, norm=Norm.LAYER, norm_eps=1e-5, positional=Positional.LEARNED)
    counts = positions.counts(build(arch), positions.numbered(16))
    assert counts["edges"]["total"] == 519_856 == 16 * 32_491
    assert sum(counts["edges"]["by_receiver"].values()) == 519_856


def test_edge_names_carry_the_position_and_parse_back():
    g = load_model("random:gpt2-tiny").graph
    names = ("IO", "S2", "END")
    mask = positions.empty_mask(g, 3)
    mask[2, g.sender_index["a1.h2"], g.logits_col] = True
    mask[0, 0, g.receiver_index["a0.h1<k>"]] = True
    listed = positions.edge_names(g, names, mask)
    assert listed == ["input@IO->a0.h1<k>@IO", "a1.h2@END->logits@END"]
    assert torch.equal(positions.mask_from_edges(g, names, listed), mask)
    for bad in ("a1.h2@END->logits@IO", "a1.h2@XX->logits@XX", "a1.h2->logits"):
        with pytest.raises(KeyError):
            positions.edge(g, names, bad)


# ---- invariants at position grain, every ablation ----------------------------------------------

@pytest.mark.parametrize("ablation", ABLATIONS)
def test_full_circuit_at_position_grain_reproduces_clean_logits(tiny, ablation):
    task = random_task(tiny)
    _, setup = setups(tiny, task, ablation)
    chunk = setup.chunks[0]
    with torch.no_grad():
        patched = patching.run(tiny.weights, tiny.graph, task.clean, coef=setup.coef(setup.full_mask()),
                               ablated=chunk.ablated, groups=chunk.groups).logits
    assert (patched - tiny.bridge(task.clean)).abs().max() <= 1e-4


def test_empty_circuit_at_position_grain_reproduces_corrupted_logits(tiny):
    task = random_task(tiny)
    _, setup = setups(tiny, task, Ablation.RESAMPLE)
    chunk = setup.chunks[0]
    with torch.no_grad():
        patched = patching.run(tiny.weights, tiny.graph, task.clean, coef=setup.coef(setup.empty_mask()),
                               ablated=chunk.ablated, groups=chunk.groups).logits
    assert (patched - tiny.bridge(task.corrupted)).abs().max() <= 1e-4


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_position_of_an_edge_set_equals_the_plain_circuit(ablation):
    for spec in TINY[:3]:
        model = load_model(spec)
        g = model.graph
        for task in (random_task(model, n=5), labelled_task(model)):
            plain, pos = setups(model, task, ablation)
            mask = (torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(4)) > 0.5) & g.allowed
            lifted = mask.expand(pos.n_positions, -1, -1).clone()
            assert torch.allclose(pos.metric(lifted), plain.metric(mask), atol=1e-5), spec
            # a batch of position-aware variants, one of them started from a cached layer
            batch = torch.stack([lifted, pos.empty_mask()])
            both = pos.metric_of_coef(pos.coef(batch))
            assert torch.allclose(both[0], plain.metric(mask), atol=1e-5)
            assert torch.allclose(both[1], plain.metric(g.empty_mask()), atol=1e-5)


def test_kept_edges_form_at_position_grain_equals_the_general_patch():
    """One variant runs the kept-edges form (only senders with a kept edge are stored); a batch of
    variants runs the general per-position matmul: same logits, fractional coefficients included."""
    for spec in TINY[:3]:
        model = load_model(spec)
        g = model.graph
        task = labelled_task(model)
        _, setup = setups(model, task, Ablation.RESAMPLE)
        chunk = setup.chunks[0]
        gen = torch.Generator().manual_seed(5)
        P = setup.n_positions
        for sparsity in (0.97, 0.5):
            keep = torch.rand(P, g.n_senders, g.n_receivers, generator=gen) > sparsity
            coef = torch.where(keep, torch.rand(P, g.n_senders, g.n_receivers, generator=gen).round(decimals=1),
                               torch.ones(())) * g.allowed
            with torch.no_grad():
                one = patching.run(model.weights, g, task.clean, positions=task.positions, coef=coef,
                                   ablated=chunk.ablated, groups=chunk.groups).logits
                two = patching.run(model.weights, g, task.clean, positions=task.positions,
                                   coef=torch.stack([coef, coef]), ablated=chunk.ablated, groups=chunk.groups).logits
            assert torch.allclose(one, two[: len(one)], atol=1e-5), (spec, sparsity)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_position_aware_attribution_sums_to_the_plain_scores(ablation):
    for spec in ("random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny"):
        model = load_model(spec)
        for task in (random_task(model, n=5), labelled_task(model)):
            plain, pos = setups(model, task, ablation)
            for name in GRADIENT:
                a, b = methods.get(name).score(plain), methods.get(name).score(pos)
                assert b.shape == (pos.n_positions, *a.shape)
                # absolute, although zero ablation on random llama-tiny gives scores of ~20
                assert (b.sum(0) - a).abs().max() <= 1e-5, (spec, name, (b.sum(0) - a).abs().max().item())


def test_one_position_patched_matches_hand_computation():
    """Micro model: logits[p] = x[p] + mean_{j<=p} x[j]. Ablating input->a0.h0<v> at position 1
    replaces x[1] by the corrupted x'[1] inside the mean only, for every later position."""
    from test_patching import micro_model
    w = micro_model()
    g = build(w.arch)
    clean, corrupted = torch.tensor([[0, 1, 2]]), torch.tensor([[2, 2, 0]])
    x, xc = w.W_E[clean[0]], w.W_E[corrupted[0]]
    ablated = patching.ablated_outputs(w, g, Ablation.RESAMPLE, corrupted=corrupted)
    coef = torch.zeros(3, g.n_senders, g.n_receivers)
    coef[1, 0, g.receiver_index["a0.h0<v>"]] = 1.0
    groups = TokenGroups.of(torch.arange(3)[None], 3)
    got = patching.run(w, g, clean, coef=coef, ablated=ablated, groups=groups).logits[0, :, :2]
    mixed = x.clone()
    mixed[1] = xc[1]
    mean = lambda v: torch.cumsum(v, 0) / torch.arange(1, 4)[:, None]
    assert torch.allclose(got, x + mean(mixed))
    coef = torch.zeros(3, g.n_senders, g.n_receivers)
    coef[2, 0, g.logits_col] = 1.0                        # input->logits at the last position only
    got = patching.run(w, g, clean, coef=coef, ablated=ablated, groups=groups).logits[0, :, :2]
    expected = x + mean(x)
    expected[2] = xc[2] + mean(x)[2]
    assert torch.allclose(got, expected)


def test_exact_at_position_grain_equals_attribution_on_a_linear_model():
    from test_methods import linear_model
    model = linear_model()
    task = from_pairs("t", [[1, 2, 3, 4], [2, 3, 1, 0]], [[5, 6, 0, 1], [4, 4, 2, 2]], [[1], [2]], [[3], [4]])
    setup = evaluation.prepare(model, task, positions=positions.of_task(task))
    exact, eap = methods.get("exact").score(setup), methods.get("eap").score(setup)
    assert exact.shape == (4, model.graph.n_senders, model.graph.n_receivers)
    assert torch.allclose(exact, eap, atol=1e-5) and exact.abs().max() > 0.1


def test_acdc_at_position_grain_equals_its_naive_reference():
    model = load_model("random:gpt2-tiny")
    task = random_task(model, n=3, length=3)
    _, setup = setups(model, task, Ablation.RESAMPLE)
    fast = acdc(setup, 1e-4)
    naive = acdc(setup, 1e-4, naive=True)
    assert fast.mask.shape == setup.full_mask().shape
    assert torch.equal(fast.mask, naive.mask)
    assert 0 < int(fast.mask.sum()) < setup.n_edges
    # from a start mask (hybrid): tests start from the cached state under that mask
    start = select.top_n(model.graph, methods.get("eap").score(setup), 60)
    fast = acdc(setup, 1e-4, start_mask=start)
    naive = acdc(setup, 1e-4, start_mask=start, naive=True)
    assert torch.equal(fast.mask, naive.mask) and not bool((fast.mask & ~start).any())


def test_selection_and_pruning_at_position_grain():
    g = load_model("random:gpt2-tiny").graph
    scores = torch.randn(3, g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0))
    top = select.top_n(g, scores, 40)
    assert int(top.sum()) == 40 and top.shape == scores.shape
    assert int(select.top_n(g, scores, 10**9).sum()) == 3 * g.n_edges
    pruned = select.prune(g, top)
    assert torch.equal(pruned, top & select.prune(g, top.any(0))[None])
    with pytest.raises(ValueError):
        select.greedy(g, scores, 5)


def test_induction_puts_the_previous_token_edge_at_the_repeated_token():
    """induction-2l, BOS r1..r10 r1..r9 → r10: the induction heads at the last token attend to
    r10 (position 10), whose key carries r9 through the previous-token head a0.h1. The position-
    aware circuit keeps a0.h1's edges there only, not at every position."""
    from circuits.tasks.builtin import build_task
    model = load_model("induction-2l")
    task = build_task("induction", model, n=16, seed=0)
    setup = evaluation.prepare(model, task, positions=positions.of_task(task))
    scores = methods.get("eap-ig-activations").score(setup)
    mask = select.prune(model.graph, select.top_n(model.graph, scores, 24))
    c = circuit_io.Circuit(model.graph, mask, scores, positions=setup.positions.names)
    prev = [e for e in c.edge_names() if e.startswith("a0.h1@")]
    assert prev and {e.split("->")[0] for e in prev} == {"a0.h1@10"}
    assert any(e == "a0.h1@10->a1.h3<k>@10" for e in prev)
    assert setup.faithfulness(mask)["faithfulness"] > 0.7


# ---- task files: labels, and one-line errors ----------------------------------------------------

def _write(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _row(clean, positions=None):
    row = {"clean": clean, "corrupted": [t + 1 for t in clean], "answer": 5, "wrong": 6}
    if positions is not None:
        row["positions"] = positions
    return row


def test_task_file_labels_align_rows_of_different_lengths(tmp_path):
    path = _write(tmp_path, [_row([1, 2, 3, 4, 5], {"S": 1, "END": 4}),
                             _row([1, 2, 3, 4, 5, 6, 7], {"END": 6, "S": 3})])
    task = load_file(path, None)
    assert task.position_names == ("S", "END")
    found = positions.of_task(task)
    # a label names the last token of its span
    assert found.group[0, :5].tolist() == [0, 0, 1, 1, 1]
    assert found.group[1].tolist() == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("rows, message", [
    ([_row([1, 2, 3], {"END": 2}), _row([1, 2, 3])], "line 2: no position labels"),
    ([_row([1, 2, 3], {"S": 0, "END": 2}), _row([1, 2, 3], {"END": 2})], "line 2: position labels differ"),
    ([_row([1, 2, 3], {"END": 2}), _row([1, 2, 3], {"END": 3})], "line 2: position 'END' is token 3, past the prompt"),
    ([_row([1, 2, 3], {"S": 0, "END": 2}), _row([1, 2, 3], {"S": 2, "END": 1})], "same order"),
    ([_row([1, 2, 3], {"END": "x"})], "should be a token index"),
    ([_row([1, 2, 3], ["END"])], "should map labels to token indices"),
])
def test_bad_position_labels_are_refused_in_one_line(tmp_path, rows, message):
    with pytest.raises(TaskError, match=message) as err:
        load_file(_write(tmp_path, rows), None)
    assert "\n" not in str(err.value)


def test_unequal_lengths_without_labels_are_refused(tmp_path):
    task = load_file(_write(tmp_path, [_row([1, 2, 3]), _row([1, 2, 3, 4])]), None)
    with pytest.raises(PositionError, match="prompts of 3 to 4 tokens and no position labels") as err:
        positions.of_task(task)
    assert "\n" not in str(err.value)
    with pytest.raises(PositionError, match="--positions 5"):
        positions.of_task(task.subset([0]), 5)


# ---- circuit files at position grain ----------------------------------------------------------

def test_position_circuit_round_trips_through_circuits_json(tmp_path):
    model = load_model("random:gpt2-tiny")
    task = labelled_task(model)
    _, setup = setups(model, task, Ablation.RESAMPLE)
    found = discover.run(setup, "eap", selection=discover.Selection(top_n=30))
    c = found.circuit
    assert c.positions == ("A", "B", "END") and c.mask.shape[0] == 3
    circuit_io.save(c, tmp_path / "c.json")
    back = circuit_io.load(tmp_path / "c.json", model.graph)
    assert back.positions == c.positions
    assert torch.equal(back.mask, c.mask) and torch.equal(back.scores, c.scores)
    with pytest.raises(circuit_io.CircuitFileError, match="no token positions"):
        formats.save_mib_json(c, tmp_path / "m.json")


# ---- neuron masks -----------------------------------------------------------------------------

def _neuron_circuit(model, seed=0):
    g, d = model.graph, model.arch.d_model
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(g.n_senders, g.n_receivers, generator=gen) > 0.3) & g.allowed
    neurons = torch.rand(g.n_senders, d, generator=gen) > 0.5
    return circuit_io.Circuit(g, mask, torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.allowed,
                              {}, None, neurons, torch.randn(g.n_senders, d, generator=gen))


def test_neuron_masks_round_trip_through_mib_pt_and_json_losslessly(tmp_path):
    model = load_model("random:gpt2-tiny")
    c = _neuron_circuit(model)
    formats.save_mib_pt(c, tmp_path / "c.pt")
    formats.save_mib_json(c, tmp_path / "c.json")
    circuit_io.save(c, tmp_path / "own.json")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["neurons_in_graph"].shape == raw["neurons_scores"].shape == (model.graph.n_senders, model.arch.d_model)
    for back in (formats.load_mib(tmp_path / "c.pt", model.graph), formats.load_mib(tmp_path / "c.json", model.graph),
                 circuit_io.load(tmp_path / "own.json", model.graph)):
        assert torch.equal(back.neurons, c.neurons)
        assert torch.equal(back.neuron_scores, c.neuron_scores)
        assert torch.equal(back.mask, c.mask)


def test_bad_neuron_tables_are_refused(tmp_path):
    model = load_model("random:gpt2-tiny")
    data = formats.to_mib(_neuron_circuit(model))
    del data["nodes"]["a0.h1"]["neurons"]
    with pytest.raises(circuit_io.CircuitFileError, match="node a0.h1 has no 'neurons'"):
        formats.from_mib(data, model.graph)
    data = formats.to_mib(_neuron_circuit(model))
    data["nodes"]["m0"]["neurons_scores"] = [1.0, 2.0]
    with pytest.raises(circuit_io.CircuitFileError, match="d_model"):
        formats.from_mib(data, model.graph)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_neuron_masks_evaluate_like_edges(tiny, ablation):
    """All neurons kept: the edge circuit unchanged. All neurons of a node set K kept, none of
    the others: the edge circuit of K's outgoing edges."""
    task = random_task(tiny)
    setup = evaluation.prepare(tiny, task, ablation)
    g, d = tiny.graph, tiny.arch.d_model
    mask = (torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1)) > 0.4) & g.allowed
    every = torch.ones(g.n_senders, d, dtype=torch.bool)
    assert torch.allclose(setup.metric(mask, neurons=every), setup.metric(mask), atol=1e-5)
    keep = torch.zeros(g.n_senders, dtype=torch.bool)
    keep[[0, 2, g.n_senders - 1]] = True
    nodes = keep[:, None].expand(-1, d)
    assert torch.allclose(setup.metric(g.full_mask(), neurons=nodes),
                          setup.metric(g.allowed & keep[:, None]), atol=1e-5)
    assert torch.allclose(setup.metric(mask, neurons=nodes), setup.metric(mask & keep[:, None]), atol=1e-5)


def test_neuron_scores_sum_to_the_edge_scores():
    """A sender's output feeds every later receiver: Σ_dims neuron score = Σ_receivers edge score."""
    for spec in ("random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny"):
        model = load_model(spec)
        setup = evaluation.prepare(model, random_task(model))
        for mode, alphas in (("inputs", [1.0]), ("activations", [0.25, 0.75])):
            found = attribute(setup, alphas, mode, neurons=True)
            assert (found.neurons.sum(1) - found.edges.sum(1)).abs().max() <= 1e-5


def test_neuron_discovery_keeps_every_edge_and_selects_neurons():
    model = load_model("random:gpt2-tiny")
    setup = evaluation.prepare(model, random_task(model, n=6))
    found = discover.run(setup, "eap", selection=discover.Selection(top_n=20), neurons=True)
    c = found.circuit
    assert int(c.neurons.sum()) == 20 and c.n_edges == model.graph.n_edges
    top = c.neuron_scores.abs().flatten().topk(20).indices
    assert bool(c.neurons.flatten()[top].all())
    assert found.faithfulness["circuit"] == pytest.approx(setup.metric(c.mask, neurons=c.neurons).mean().item())

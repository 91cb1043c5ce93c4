"""tracr-compiled models: exact programs, their ground truth, and methods scored against it.

Runs without jax/tracr: the converted models and their ground truth ship in circuits/builtin.
"""

import dataclasses
import itertools

import pytest
import torch
from conftest import load_model

from circuits import evaluation, methods, patching, select
from circuits.graph import node_scores as graph_node_scores
from circuits.methods.acdc import acdc
from circuits.model import loader, tracr
from circuits.tasks.builtin import build_task
from circuits.tasks.task import Metric, TaskError
from circuits.verify import groundtruth

PROGRAMS = ["tracr-reverse", "tracr-proportion", "tracr-sort"]
ABLATIONS = [patching.Ablation.ZERO, patching.Ablation.RESAMPLE]


@pytest.fixture(scope="module")
def tracr_model():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = loader.load(name)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def setups(tracr_model):
    cache = {}

    def get(name, ablation):
        if (name, ablation) not in cache:
            model = tracr_model(name)
            data = groundtruth.GROUND_TRUTH_DATA
            task = build_task("tracr", model, n=data["n"], seed=data["seed"])
            cache[name, ablation] = evaluation.prepare(model, task, ablation)
        return cache[name, ablation]
    return get


def _all_inputs(model):
    tr = model.meta["tracr"]
    program = tracr.PROGRAMS[tr["program"]]
    vocab = [v for v in tr["input_vocab"] if v not in (tr["bos"], tr["pad"])]
    for length in range(1, tr["max_seq_len"] + 1):
        rows = (itertools.permutations(vocab, length) if program.distinct
                else itertools.product(vocab, repeat=length))
        yield length, [list(r) for r in rows]


@pytest.mark.parametrize("name", PROGRAMS)
def test_converted_model_reproduces_tracr_outputs(tracr_model, name):
    model = tracr_model(name)
    tr = model.meta["tracr"]
    for ex in tr["examples"]:
        ids = torch.tensor([model.tokenizer.encode(" ".join([tr["bos"]] + ex["input"]))])
        logits = patching.run(model.weights, model.graph, ids).logits[0]
        if tr["categorical"]:
            assert [tr["output_vocab"][i] for i in logits[1:].argmax(-1).tolist()] == ex["decoded"]
        else:
            assert logits[-1, 0].item() == pytest.approx(ex["last_raw"][0], abs=1e-5)


@pytest.mark.parametrize("name", PROGRAMS)
def test_converted_model_computes_its_program_on_every_input(tracr_model, name):
    """Exhaustive over every input up to the compiled length, against the Python reference."""
    model = tracr_model(name)
    tr = model.meta["tracr"]
    n = 0
    for length, rows in _all_inputs(model):
        ids = torch.tensor([model.tokenizer.encode(" ".join([tr["bos"]] + r)) for r in rows])
        out = patching.run(model.weights, model.graph, ids).logits[:, -1]
        for r, o in zip(rows, out):
            want = tracr.PROGRAMS[tr["program"]].reference(r)
            if tr["categorical"]:
                assert tr["output_vocab"][int(o.argmax())] == str(want), r
            else:
                assert o[0].item() == pytest.approx(want, abs=1e-3), r
            n += 1
    assert n > 300


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: a.value)
def test_shipped_ground_truth_is_reproduced_structural_and_sufficient(tracr_model, setups, name, ablation):
    model, setup = tracr_model(name), setups(name, ablation)
    shipped = groundtruth.shipped_ground_truth(model, ablation.value)
    assert torch.equal(groundtruth.ground_truth(setup), shipped)
    structural = groundtruth.structural_mask(model.weights, model.graph)
    assert not (shipped & ~structural).any()
    assert setup.faithfulness(shipped)["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    # Every ground-truth edge is necessary: removing it alone changes the metric.
    for s, r in torch.nonzero(shipped).tolist():
        mask = shipped.clone()
        mask[s, r] = False
        assert setup.faithfulness(mask)["faithfulness"] < 0.999, model.graph.edge_name(s, r)


def test_reverse_ground_truth_is_the_programs_dataflow(tracr_model):
    """Zero ablation: length (selector width a0 → m0), opp_idx (m1, m2), the aggregate a3;
    the selector-width head's query/key (an always-true selector) and a3's query `one` drop out."""
    model = tracr_model("tracr-reverse")
    truth = model.meta["tracr"]["ground_truth"]
    assert set(truth["zero"]) == {
        "input->a0.h0<v>", "a0.h0->m0", "input->m0", "m0->m1", "input->m1", "m1->m2",
        "m2->a3.h0<q>", "input->a3.h0<k>", "input->a3.h0<v>", "a3.h0->logits"}
    assert set(truth["resample"]) == {"input->a3.h0<v>", "a3.h0->logits"}
    assert truth["carries"]["m2->a3.h0<q>"] == ["opp_idx-1_3"]
    assert "input->a0.h0<q>" in truth["carries"] and "input->a0.h0<q>" not in truth["zero"]


# The published canonical edge sets, in this engine's edge names: Conmy et al. (2023) wrote theirs
# by hand for zero ablation; Miller et al. (auto-circuit's `*_true_edges`/`*_official_edges`)
# give the ones resample ablation needs. Ours are computed by ablating, and must agree.
PUBLISHED_GROUND_TRUTH = {
    ("tracr-reverse", "zero"): {
        "a3.h0->logits", "m2->a3.h0<q>", "input->a3.h0<k>", "input->a3.h0<v>", "m1->m2",
        "m0->m1", "input->m1", "a0.h0->m0", "input->m0", "input->a0.h0<v>"},
    ("tracr-reverse", "resample"): {"input->a3.h0<v>", "a3.h0->logits"},
    ("tracr-proportion", "zero"): {
        "a1.h0->logits", "input->a1.h0<q>", "input->a1.h0<k>", "m0->a1.h0<v>", "input->m0"},
    ("tracr-proportion", "resample"): {"input->m0", "m0->a1.h0<v>", "a1.h0->logits"},
}


@pytest.mark.parametrize("name,ablation", list(PUBLISHED_GROUND_TRUTH), ids=lambda x: x)
def test_computed_ground_truth_equals_the_published_one(tracr_model, name, ablation):
    assert set(tracr_model(name).meta["tracr"]["ground_truth"][ablation]) == \
        PUBLISHED_GROUND_TRUTH[name, ablation]


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: a.value)
def test_acdc_reaches_auroc_1(tracr_model, setups, name, ablation):
    model, setup = tracr_model(name), setups(name, ablation)
    truth = groundtruth.shipped_ground_truth(model, ablation.value)
    masks = [select.prune(model.graph, acdc(setup, tau, metric=setup.task.metric).mask)
             for tau in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert groundtruth.sweep_auroc(model.graph, masks, truth) == 1.0


@pytest.mark.parametrize("name,ablation", [
    ("tracr-proportion", patching.Ablation.ZERO),
    ("tracr-reverse", patching.Ablation.RESAMPLE),
    ("tracr-proportion", patching.Ablation.RESAMPLE),
    ("tracr-sort", patching.Ablation.RESAMPLE),
], ids=lambda x: getattr(x, "value", x))
@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_eap_ig_reaches_auroc_1(tracr_model, setups, name, ablation, method):
    model, setup = tracr_model(name), setups(name, ablation)
    truth = groundtruth.shipped_ground_truth(model, ablation.value)
    scores = methods.get(method).score(setup)
    assert groundtruth.edge_auroc(model.graph, scores, truth) == 1.0


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: a.value)
def test_node_level_auroc(tracr_model, setups, name, ablation):
    """Components (heads, MLPs) touching a ground-truth edge, ranked by summed |edge score|:
    every gradient method ranks them perfectly in every setting."""
    model, setup = tracr_model(name), setups(name, ablation)
    nodes = groundtruth.truth_nodes(model.graph, groundtruth.shipped_ground_truth(model, ablation.value))
    assert nodes and "input" not in nodes and "logits" not in nodes
    for method in ("eap-ig-inputs", "eap-ig-activations", "clean-corrupted"):
        node = graph_node_scores(model.graph, methods.get(method).score(setup))
        assert groundtruth.node_auroc(model.graph, node, nodes) == 1.0, method


@pytest.mark.parametrize("name", PROGRAMS)
def test_eap_refuses_divergence_metrics(tracr_model, setups, name):
    """KL/MSE to the clean run have zero gradient at the clean run: EAP's scores would be
    rounding noise (~1e-8 on tracr-reverse), so it says so instead of ranking noise."""
    with pytest.raises(ValueError, match="zero gradient"):
        methods.get("eap").score(setups(name, patching.Ablation.ZERO))


# The README's table, every cell: (ACDC over a τ sweep, EAP-IG inputs, EAP-IG activations,
# clean-corrupted).
README_AUROC = {
    ("tracr-reverse", "zero"): (1.0, 0.996, 0.945, 0.946),   # last two: order of scores < 1e-12
    ("tracr-reverse", "resample"): (1.0, 1.0, 1.0, 1.0),
    ("tracr-proportion", "zero"): (1.0, 1.0, 1.0, 0.7),
    ("tracr-proportion", "resample"): (1.0, 1.0, 1.0, 1.0),
    ("tracr-sort", "zero"): (1.0, 0.984, 0.968, 0.948),
    ("tracr-sort", "resample"): (1.0, 1.0, 1.0, 1.0),
}


@pytest.mark.parametrize("name,ablation", list(README_AUROC), ids=lambda x: x)
def test_readme_auroc_table(tracr_model, setups, name, ablation):
    model, setup = tracr_model(name), setups(name, patching.Ablation(ablation))
    truth = groundtruth.shipped_ground_truth(model, ablation)
    masks = [select.prune(model.graph, acdc(setup, tau, metric=setup.task.metric).mask)
             for tau in (1e-1, 1e-2, 1e-3, 1e-4)]
    got = [groundtruth.sweep_auroc(model.graph, masks, truth)] + [
        groundtruth.edge_auroc(model.graph, methods.get(m).score(setup), truth)
        for m in ("eap-ig-inputs", "eap-ig-activations", "clean-corrupted")]
    assert [round(x, 3) for x in got] == list(README_AUROC[name, ablation])


def test_acdc_scores_are_importances_like_exact(tracr_model, setups):
    """Same sign convention as every scoring method: higher = more important."""
    model, setup = tracr_model("tracr-reverse"), setups("tracr-reverse", patching.Ablation.ZERO)
    exact = methods.get("exact").score(setup)
    for metric in (Metric.KL, Metric.LOGIT_DIFF):
        result = acdc(setup, 1e-3, metric=metric)
        kept = result.mask & model.graph.allowed
        assert (result.scores[kept] > 0).all() and (exact[kept] > 0).all(), metric


@pytest.mark.parametrize("name", ["tracr-reverse", "tracr-sort"])
def test_eap_ig_under_zero_ablation_misses_step_functions(tracr_model, setups, name):
    """Known limit, kept visible. tracr models have no biases: an MLP reads its bias from the
    `one` direction of the stream. Zero ablation scales that direction down with the signal along
    the integration path, so the selector-width MLP's ReLUs stay on the plateau they sit on in the
    clean run and its input gradient is ~0 at every step, although zero-ablating the edge changes
    the output; and a hard attention's `one`/BOS inputs get gradient on the path but have no
    effect at the end points. EAP-IG ranks all but those few edges correctly, at any step count."""
    model, setup = tracr_model(name), setups(name, patching.Ablation.ZERO)
    truth = groundtruth.shipped_ground_truth(model, "zero")
    for steps in (5, 50):
        scores = methods.get("eap-ig-inputs").score(setup, steps=steps)
        assert 0.97 <= groundtruth.edge_auroc(model.graph, scores, truth) < 1.0


def test_gradient_scores_are_exactly_zero_off_the_structure(tracr_model, setups):
    """No normalization: a receiver's gradient tap must not see other readers of the stream."""
    model, setup = tracr_model("tracr-reverse"), setups("tracr-reverse", patching.Ablation.ZERO)
    structural = groundtruth.structural_mask(model.weights, model.graph)
    for method in ("clean-corrupted", "eap-ig-inputs", "eap-ig-activations"):
        scores = methods.get(method).score(setup)
        assert (scores[model.graph.allowed & ~structural] == 0).all(), method


def test_padding_is_masked_like_tracr(tracr_model):
    """Right-padded rows give the same outputs as the same rows run alone, unpadded."""
    model = tracr_model("tracr-reverse")
    task = build_task("tracr", model, n=16, seed=3)
    assert len(set(task.lengths.tolist())) > 1
    padded = patching.run(model.weights, model.graph, task.clean, positions=task.positions).logits
    for i in range(len(task)):
        alone = task.clean[i : i + 1, : int(task.lengths[i])]
        one = patching.run(model.weights, model.graph, alone, positions=task.positions[i : i + 1]).logits
        torch.testing.assert_close(padded[i : i + 1], one, atol=1e-5, rtol=0)


def test_non_causal_model_without_pad_masking_refuses_ragged_prompts(tracr_model):
    model = tracr_model("tracr-reverse")
    weights = dataclasses.replace(model.weights, arch=dataclasses.replace(model.weights.arch, pad_token_id=None))
    bare = dataclasses.replace(model, weights=weights)
    task = build_task("tracr", model, n=16, seed=3)
    with pytest.raises(ValueError, match="one length"):
        evaluation.prepare(bare, task, patching.Ablation.ZERO)


def test_tracr_task_needs_a_tracr_model():
    with pytest.raises(TaskError, match="tracr-compiled"):
        build_task("tracr", load_model("induction-2l"))


def test_tracr_task_metrics(tracr_model):
    assert build_task("tracr", tracr_model("tracr-reverse"), n=8).metric is Metric.KL
    assert build_task("tracr", tracr_model("tracr-proportion"), n=8).metric is Metric.MSE


def test_compiling_reproduces_the_shipped_weights(tracr_model):
    pytest.importorskip("tracr")
    from safetensors.numpy import load_file
    for name in tracr.PROGRAMS:
        assembled, out_sop = tracr.compile_program(name)
        cfg, state, meta = tracr.convert(assembled, tracr.PROGRAMS[name], out_sop)
        shipped = load_file(str(loader.BUILTIN_DIR / f"tracr-{name}" / "model.safetensors"))
        assert set(state) == set(shipped)
        for k in state:
            assert (state[k] == shipped[k]).all(), k


def test_cli_discover_reports_the_ground_truth(tmp_path, capsys):
    from circuits.cli.main import main
    out = str(tmp_path / "c.json")
    assert main(["discover", "tracr-reverse", "tracr", "--ablation", "zero", "--method", "acdc",
                 "--quiet", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "ground truth (zero ablation): 10 of 10 edges found, 0 extra" in printed
    assert "AUROC of the scores: edges 1.000, components 1.000" in printed

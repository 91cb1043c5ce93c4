"""Nothing lost, nothing silently wrong (issue 12).

The table: every bad input or failing environment gives one line (no traceback), a non-zero
exit status, and leaves every pre-existing output file byte-for-byte as it was (and no stray
temporary or lock file). Then fault injection: a full disk at every write of an export and of
an ACDC checkpoint, an interruption at every step boundary of ACDC's bookkeeping, and a SIGKILL
of a real run, each followed by --resume, must all give the uninterrupted circuit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuits.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
IOI = str(ROOT / "tasks" / "examples" / "ioi-mini.jsonl")
PRE = b"PRE-EXISTING OUTPUT \x00\x01 keep me\n"
INDUCTION = {"family": "gpt2", "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "has_mlp": True, "parallel": False}


# ---- inputs the table uses ------------------------------------------------------------------

def _circuit_data(method: str = "eap") -> dict:
    from circuits import circuit as circuit_io
    g = circuit_io.graph_from_summary(INDUCTION)
    scores = torch.linspace(-1, 1, g.n_senders * g.n_receivers).view(g.n_senders, g.n_receivers)
    c = circuit_io.Circuit(g, g.full_mask(), scores, {"model": "induction-2l", "method": method})
    return circuit_io.to_dict(c)


def _dump(path: Path, data) -> str:
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def _inputs(d: Path) -> None:
    data = _circuit_data()
    _dump(d / "good.json", data)
    first = next(iter(data["edges"]))
    bad = json.loads(json.dumps(data))
    bad["edges"][first]["in_graph"] = "false"
    _dump(d / "in_graph_string.json", bad)
    bad = {k: v for k, v in data.items() if k != "edges"}
    _dump(d / "no_edges.json", bad)
    text = json.dumps(data, indent=1).replace(json.dumps(data["edges"][first]["score"]), "NaN", 1)
    (d / "nan_score.json").write_text(text)
    bad = json.loads(json.dumps(data))
    bad["edges"]["a7.h0->m7"] = {"score": 1.0, "in_graph": True}
    _dump(d / "foreign_edge.json", bad)
    bad = json.loads(json.dumps(data))
    bad["edges"][first]["score"] = "high"
    _dump(d / "score_string.json", bad)
    bad = json.loads(json.dumps(data))
    bad["edges"][first]["weight"] = 2
    _dump(d / "extra_key.json", bad)
    bad = json.loads(json.dumps(data))
    bad["schema_version"] = 99
    _dump(d / "newer.json", bad)
    (d / "not_json.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "binary.json").write_bytes(b"\x80\x02\xff\xfe binary")
    rows = Path(IOI).read_text().splitlines()
    (d / "latin1.jsonl").write_bytes("\n".join(rows[:3]).encode() + "\n".join(
        ['', '{"clean": "Jörg und Anna", "corrupted": "Jörg und Paul", "answer": " x", "wrong": " y"}']).encode("latin-1"))
    (d / "missing.jsonl").write_text('{"clean": "a b", "corrupted": "a c", "answer": " x"}\n')
    (d / "unknown.jsonl").write_text('{"clean": "a b", "corrupted": "a c", "answer": " x", "wrong": " y", "extra": 1}\n')
    (d / "empty.jsonl").write_text("\n\n")
    (d / "badline.jsonl").write_text(rows[0] + "\n{oops\n")
    (d / "wrongtype.jsonl").write_text('{"clean": 12.5, "corrupted": "a c", "answer": " x", "wrong": " y"}\n')
    (d / "adir").mkdir()
    (d / "ro").mkdir()


def _live_lock(d: Path) -> None:
    (d / "out.json.lock").write_text(str(os.getppid()))     # a live process that is not us


def _read_only(d: Path, monkeypatch) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == d / "ro" else real(p, mode, *a, **k))


def _disk_full(d: Path, monkeypatch) -> None:
    import circuits.files as files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", full)


def _seed_checkpoint(d: Path) -> None:
    """A checkpoint of `discover --method acdc` on induction-2l/induction with seed 0 (the
    command line's settings are compared before the model loads)."""
    from circuits.methods import acdc
    settings = {"format": acdc.CHECKPOINT_FORMAT, "method": "acdc", "seed": 0, "model": "induction-2l",
                "ablation": "resample", "tau": 0.01}
    state = acdc.WalkState(torch.ones(3, 3, dtype=torch.bool), torch.zeros(3, 3), 0, 0, 0.0, 0, 0.0)
    acdc.write_checkpoint(d / "out.json.ckpt.pt", settings, state, 0.0)


# (argv with {d} for the directory, text the one line must contain, exit status, outputs that
#  exist beforehand and must stay as they are, optional set-up)
TABLE = [
    # --- the issue's table
    ("resume-other-seed", ["discover", "induction-2l", "induction", "--n", "8", "--method", "acdc", "--resume",
                           "--seed", "1", "--out", "{d}/out.json", "--quiet"],
     "--seed was 0, now 1", 2, ["out.json"], _seed_checkpoint),
    ("export-disk-full", ["export", "{d}/good.json", "--format", "mib-json", "-o", "{d}/out.json"],
     "cannot write {d}/out.json: No space left on device", 2, ["out.json"], _disk_full),
    ("export-pt-disk-full", ["export", "{d}/good.json", "--format", "mib-pt", "-o", "{d}/out.pt"],
     "cannot write {d}/out.pt: No space left on device", 2, ["out.pt"], _disk_full),
    ("render-disk-full", ["render", "{d}/good.json", "-o", "{d}/out.dot"],
     "cannot write {d}/out.dot: No space left on device", 2, ["out.dot"], _disk_full),
    ("out-missing-dir", ["discover", "--out", "{d}/nowhere/c.json"], "directory {d}/nowhere does not exist", 2, [], None),
    ("export-missing-dir", ["export", "{d}/good.json", "--format", "graphml", "-o", "{d}/nowhere/c.graphml"],
     "does not exist", 2, [], None),
    ("out-read-only-dir", ["discover", "--out", "{d}/ro/c.json"], "directory {d}/ro is not writable", 2, [], _read_only),
    ("verify-read-only-dir", ["verify", "{d}/good.json", "induction-2l", "induction", "--out", "{d}/ro/r.json"],
     "is not writable", 2, [], _read_only),
    ("same-out-as-running", ["discover", "--out", "{d}/out.json"], "is being written by another run", 2, ["out.json"],
     lambda d: _live_lock(d)),
    ("in-graph-string", ["render", "{d}/in_graph_string.json", "-o", "{d}/out.svg"],
     "in_graph: 'false' is not of type 'boolean'", 2, ["out.svg", "out.dot"], None),
    ("edges-missing", ["export", "{d}/no_edges.json", "--format", "json", "-o", "{d}/out.json"],
     "'edges' is missing", 2, ["out.json"], None),
    ("nan-score", ["render", "{d}/nan_score.json", "-o", "{d}/out.svg"], "NaN is not a finite number", 2,
     ["out.svg", "out.dot"], None),
    ("threshold-inf", ["discover", "--threshold", "inf"], "--threshold: must be a finite number", "usage", [], None),
    ("tau-nan", ["discover", "--method", "acdc", "--tau", "nan"], "--tau: must be a finite number", "usage", [], None),
    ("min-faithfulness-nan", ["verify", "{d}/good.json", "induction-2l", "induction", "--min-faithfulness", "nan"],
     "--min-faithfulness: must be a finite number", "usage", [], None),
    ("target-faithfulness-nan", ["discover", "--target-faithfulness", "nan"], "must be in (0, 1]", "usage", [], None),
    ("checkpoint-every-inf", ["discover", "--method", "acdc", "--checkpoint-every", "inf"], "must be a finite number",
     "usage", [], None),
    ("unknown-model-offline", ["graph", "gpt2"], "unknown model 'gpt2'", 2, [], None),
    ("args-wrong-order", ["discover", "induction", "induction-2l", "--out", "{d}/out.json"],
     "'induction' is a task, not a model", 2, ["out.json"], None),
    ("task-file-as-model", ["evaluate", IOI, "induction-2l"], "is a task, not a model", 2, [], None),
    ("task-not-utf8", ["evaluate", "random:gpt2-tiny", "{d}/latin1.jsonl", "--quiet"], "latin1.jsonl, line 4: not UTF-8 text", 2, [], None),
    # --- bad inputs handled before, kept that way
    ("foreign-edge", ["export", "{d}/foreign_edge.json", "--format", "json", "-o", "{d}/out.json"],
     "no edge named 'a7.h0->m7'", 2, ["out.json"], None),
    ("score-string", ["export", "{d}/score_string.json", "--format", "json", "-o", "{d}/out.json"],
     "score: 'high' is not of type", 2, ["out.json"], None),
    ("edge-extra-key", ["export", "{d}/extra_key.json", "--format", "json", "-o", "{d}/out.json"],
     "'weight' was unexpected", 2, ["out.json"], None),
    ("newer-schema", ["render", "{d}/newer.json", "-o", "{d}/out.svg"], "schema version 99 is newer", 2,
     ["out.svg", "out.dot"], None),
    ("circuit-not-json", ["render", "{d}/not_json.json", "-o", "{d}/out.svg"], "not valid JSON", 2, ["out.svg"], None),
    ("circuit-a-list", ["render", "{d}/list.json", "-o", "{d}/out.svg"], "a JSON list, not an object", 2, ["out.svg"], None),
    ("circuit-binary", ["render", "{d}/binary.json", "-o", "{d}/out.svg"], "binary content", 2, ["out.svg"], None),
    ("circuit-missing", ["render", "{d}/absent.json", "-o", "{d}/out.svg"], "no such circuit file", 2, ["out.svg"], None),
    ("out-is-directory", ["export", "{d}/good.json", "--format", "json", "-o", "{d}/adir"], "is a directory", 2, [], None),
    ("export-wrong-suffix", ["export", "{d}/good.json", "--format", "mib-pt", "-o", "{d}/out.json"],
     ".json is not a format this command writes; use .pt or .pth", 2, ["out.json"], None),
    ("render-unknown-suffix", ["render", "{d}/good.json", "-o", "{d}/out.bmp"], ".bmp is not a format", 2, [], None),
    ("discover-out-suffix", ["discover", "--out", "{d}/out.txt"], "use .json", 2, ["out.txt"], None),
    ("export-over-input", ["export", "{d}/good.json", "--format", "json", "-o", "{d}/good.json"],
     "is the input file", 2, ["good.json"], None),
    ("task-missing-field", ["evaluate", "random:gpt2-tiny", "{d}/missing.jsonl", "--quiet"], "line 1: missing field(s) wrong", 2, [], None),
    ("task-unknown-field", ["evaluate", "random:gpt2-tiny", "{d}/unknown.jsonl", "--quiet"], "unknown field(s) extra", 2, [], None),
    ("task-wrong-type", ["evaluate", "random:gpt2-tiny", "{d}/wrongtype.jsonl", "--quiet"],
     "line 1: field clean should be a string or a list of token ids", 2, [], None),
    ("task-empty", ["evaluate", "random:gpt2-tiny", "{d}/empty.jsonl", "--quiet"], "the file is empty", 2, [], None),
    ("task-bad-line", ["evaluate", "random:gpt2-tiny", "{d}/badline.jsonl", "--quiet"], "line 2: not valid JSON", 2, [], None),
    ("unknown-task", ["discover", "induction-2l", "iio"], "did you mean ioi?", 2, [], None),
    ("model-typo", ["discover", "induction-3l"], "did you mean induction-2l?", 2, [], None),
    ("resume-without-checkpoint", ["discover", "--method", "acdc", "--resume", "--out", "{d}/out.json"],
     "no checkpoint at", 2, ["out.json"], None),
    ("option-method-ignores", ["discover", "--method", "eap", "--tau", "0.1", "--out", "{d}/out.json"],
     "--tau does not apply", 2, ["out.json"], None),
    ("limit-on-builtin-task", ["evaluate", "induction-2l", "induction", "--limit", "5"], "--limit caps the rows", 2, [], None),
    ("top-n-zero", ["discover", "--top-n", "0"], "--top-n: must be at least 1", "usage", [], None),
    ("no-cuda", ["evaluate", "induction-2l", "induction", "--device", "cuda"], "no usable CUDA device", 2, [], None),
    ("compare-one", ["compare", "{d}/good.json"], "at least two circuit files", 2, [], None),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    _inputs(d)
    return d


def test_the_table_has_every_row_of_the_issue_and_more():
    assert len(TABLE) >= 30 and len({row[0] for row in TABLE}) == len(TABLE)


@pytest.mark.parametrize("name,argv,says,status,existing,prepare", TABLE, ids=[row[0] for row in TABLE])
def test_one_line_non_zero_and_outputs_untouched(name, argv, says, status, existing, prepare, inputs, tmp_path,
                                                  capsys, monkeypatch):
    for f in inputs.iterdir():
        target = tmp_path / f.name
        if f.is_dir():
            target.mkdir()
        else:
            target.write_bytes(f.read_bytes())
    for out in existing:
        (tmp_path / out).write_bytes(PRE)
    if prepare is not None:
        prepare(tmp_path, monkeypatch) if prepare.__code__.co_argcount == 2 else prepare(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    if status == "usage":
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        code = exit_.value.code
        status = 2
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert says.replace("{d}", str(tmp_path)) in err, err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "an output changed, or a temporary/lock file was left behind"


def test_the_output_check_answers_before_any_model_loads_in_under_2_s(tmp_path):
    code = ("import sys, time; t = time.perf_counter(); from circuits.cli.main import main; "
            f"rc = main(['discover', '--method', 'acdc', '--out', {str(tmp_path / 'no' / 'c.json')!r}]); "
            "print(rc, 'torch' in sys.modules, time.perf_counter() - t)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    rc, torch_loaded, seconds = done.stdout.split()
    assert rc == "2" and torch_loaded == "False" and "does not exist" in done.stderr
    assert float(seconds) < 2.0 and wall < 10.0, (seconds, wall)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from circuits.files import OutputError, OutputLock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "c.json"
    Path(str(out) + ".lock").write_text(str(dead.pid))
    with OutputLock([out]):
        assert Path(str(out) + ".lock").read_text() == str(os.getpid())
        Path(str(out) + ".lock").write_text(str(os.getppid()))      # now held by a live process
        with pytest.raises(OutputError, match="being written by another run"):
            with OutputLock([out]):
                pass
        Path(str(out) + ".lock").write_text(str(os.getpid()))
    assert not Path(str(out) + ".lock").exists()


def test_json_output_never_holds_nan(capsys, tmp_path):
    from circuits.cli.common import _print_json
    _print_json({"faithfulness": float("nan"), "ok": 1.0, "xs": [float("inf")]})
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"faithfulness": None, "ok": 1.0, "xs": [None]}
    assert "faithfulness, xs[0] undefined (NaN or infinite): written as null" in captured.err
    from circuits import circuit as circuit_io
    g = circuit_io.graph_from_summary(INDUCTION)
    scores = torch.full((g.n_senders, g.n_receivers), float("nan"))
    replaced = circuit_io.save(circuit_io.Circuit(g, g.full_mask(), scores, {"faithfulness": float("nan")}),
                               tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    assert "NaN" not in text and "provenance.faithfulness" in replaced
    json.loads(text)     # strict JSON
    from circuits.io import render
    dot = render.to_dot(circuit_io.Circuit(g, g.full_mask(), scores))
    assert "nan" not in dot


def test_verify_text_states_skipped_checks(capsys, tmp_path):
    from circuits import circuit as circuit_io
    from circuits.model import loader
    g = loader.load("induction-2l").graph
    c = circuit_io.Circuit(g, g.full_mask(), None, {"model": "induction-2l", "method": "acdc"})
    circuit_io.save(c, tmp_path / "acdc.json")
    assert main(["verify", str(tmp_path / "acdc.json"), "induction-2l", "induction", "--n", "8",
                 "--subsets", "1", "--stability", "2"]) == 0
    out = capsys.readouterr().out
    assert "stability skipped   the circuit was found by acdc" in out
    assert "curve skipped       the circuit file has no edge scores" in out


def test_task_files_stream_with_a_limit_and_a_row_count(tmp_path):
    from circuits.model import loader
    from circuits.tasks.files import load_file, row_count
    rows = Path(IOI).read_text().splitlines()
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(rows * 3) + "\n\n")
    assert row_count(path) == 3 * len(rows)
    tok = loader.gpt2_tokenizer()
    assert len(load_file(path, tok, limit=5)) == 5
    assert len(load_file(path, tok)) == 3 * len(rows)


def test_evaluate_streaming_equals_the_cached_setup():
    from circuits import evaluation, patching
    from conftest import load_model, random_task
    model = load_model("random:gpt2-tiny")
    task = random_task(model, n=7, vary_lengths=True)
    mask = model.graph.full_mask()
    mask[:, ::3] = False
    for ablation in (patching.Ablation.RESAMPLE, patching.Ablation.MEAN):
        setup = evaluation.prepare(model, task, ablation, batch_size=3)
        means = evaluation.evaluate_streaming(model, task, ablation, {"c": mask}, batch_size=3)
        assert means["c"] == pytest.approx(setup.metric(mask).mean().item(), abs=1e-5)
        assert means["clean"] == pytest.approx(setup.clean_metric().mean().item(), abs=1e-5)


# ---- fault injection ------------------------------------------------------------------------

class _FullDisk:
    """Makes the k-th write (counting from 0) and every later one fail with ENOSPC, like a disk
    that fills up; counts writes when k is None."""

    def __init__(self, k: int | None):
        self.k, self.writes = k, 0

    def open(self, real_open):
        outer = self

        class Writer:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                n = outer.writes
                outer.writes += 1
                if outer.k is not None and n >= outer.k:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        return lambda *a, **k: Writer(real_open(*a, **k))


def _sample(n: int, at_most: int) -> list[int]:
    if n <= at_most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (at_most - 1)) for i in range(at_most)})


@pytest.mark.parametrize("fmt,name", [("json", "c.json"), ("mib-json", "c.json"), ("mib-pt", "c.pt"),
                                      ("graphml", "c.graphml"), ("node-link", "c.json"), ("dot", "c.dot")])
def test_a_full_disk_at_every_write_of_an_export_keeps_the_old_file(fmt, name, tmp_path, capsys, monkeypatch):
    import builtins

    import circuits.files as files
    src = tmp_path / "src.json"
    _dump(src, _circuit_data())
    out = tmp_path / name
    counter = _FullDisk(None)
    monkeypatch.setattr(files, "open", counter.open(builtins.open), raising=False)
    assert main(["export", str(src), "--format", fmt, "-o", str(out)]) == 0
    capsys.readouterr()
    assert counter.writes >= 1
    for k in _sample(counter.writes, 12):
        out.write_bytes(PRE)
        monkeypatch.setattr(files, "open", _FullDisk(k).open(builtins.open), raising=False)
        assert main(["export", str(src), "--format", fmt, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"circuits: error: cannot write {out}: No space left on device\n", (k, err)
        assert out.read_bytes() == PRE
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.json", name]), k


@pytest.fixture(autouse=True)
def _fixed_speculation(monkeypatch):
    """Batch sizes follow a timed overhead; fixed, every run makes the same batches (and so
    passes the same step boundaries)."""
    from circuits.methods import acdc as acdc_mod
    monkeypatch.setattr(acdc_mod, "_measure_overhead", lambda *a, **k: 2.0)


def _acdc_setup():
    from circuits import evaluation
    from conftest import load_model, random_task
    model = load_model("random:gpt2-tiny")
    return evaluation.prepare(model, random_task(model, n=2))


def _same(a, b):
    """The same circuit, the same edges tested; scores (each measured in a batch of candidates,
    whose size depends on timing) equal up to float rounding."""
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.scores, b.scores, rtol=1e-3, atol=1e-6)
    assert a.tested == b.tested


def test_a_full_disk_at_every_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    import builtins

    import circuits.files as files
    from circuits.methods import acdc as acdc_mod
    setup = _acdc_setup()
    whole = acdc_mod.acdc(setup, 1e-5)
    ckpt = tmp_path / "run.ckpt.pt"
    counter = _FullDisk(None)
    monkeypatch.setattr(files, "open", counter.open(builtins.open), raising=False)
    acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, checkpoint_every=0.0)
    n = counter.writes
    assert n > 10
    for k in _sample(n, 10):
        ckpt.unlink(missing_ok=True)
        disk = _FullDisk(k)
        monkeypatch.setattr(files, "open", disk.open(builtins.open), raising=False)
        commits = {"after_failure": 0}

        def stop(name):
            # the disk filled up at write k: interrupt at the next commit after that
            if name == "committed" and disk.writes > k:
                commits["after_failure"] += 1
                if commits["after_failure"] == 2:
                    raise KeyboardInterrupt
        monkeypatch.setattr(acdc_mod, "_step", stop)
        try:
            acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, checkpoint_every=0.0)
        except KeyboardInterrupt:
            pass
        err = capsys.readouterr().err
        assert "checkpoint not updated: cannot write" in err and "No space left on device" in err, err
        assert err.count("\n") == 1
        assert [p.name for p in tmp_path.iterdir() if p.name != "run.ckpt.pt"] == []   # no temporary file
        monkeypatch.setattr(files, "open", builtins.open, raising=False)                # space again
        monkeypatch.setattr(acdc_mod, "_step", lambda name: None)
        _same(acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, resume=True), whole)


def _interrupt_everywhere(tmp_path, monkeypatch, at_most: int | None):
    from circuits.methods import acdc as acdc_mod
    setup = _acdc_setup()
    steps = []
    monkeypatch.setattr(acdc_mod, "_step", steps.append)
    whole = acdc_mod.acdc(setup, 1e-5, checkpoint=tmp_path / "count.pt", checkpoint_every=0.0)
    assert {"tested", "scored", "advanced", "decided", "removed", "committed", "saved", "dead receiver"} <= set(steps)
    chosen = range(len(steps)) if at_most is None else _sample(len(steps), at_most)
    for i in chosen:
        ckpt = tmp_path / f"run{i}.ckpt.pt"
        calls = {"n": 0}

        def boundary(name):
            calls["n"] += 1
            if calls["n"] == i + 1:
                raise KeyboardInterrupt
        monkeypatch.setattr(acdc_mod, "_step", boundary)
        with pytest.raises(KeyboardInterrupt):
            acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, checkpoint_every=0.0)
        monkeypatch.setattr(acdc_mod, "_step", lambda name: None)
        resumed = acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, resume=True)
        _same(resumed, whole)
        assert steps[i] and resumed.tested == whole.tested, (i, steps[i])


def test_an_interruption_at_step_boundaries_of_acdc_resumes_to_the_same_circuit(tmp_path, monkeypatch):
    _interrupt_everywhere(tmp_path, monkeypatch, at_most=16)


@pytest.mark.slow
def test_an_interruption_at_every_step_boundary_of_acdc_resumes_to_the_same_circuit(tmp_path, monkeypatch):
    _interrupt_everywhere(tmp_path, monkeypatch, at_most=None)


def test_resume_refuses_other_settings_naming_them(tmp_path):
    from circuits.methods import acdc as acdc_mod
    from circuits.tasks.task import Metric
    setup = _acdc_setup()
    ckpt = tmp_path / "run.ckpt.pt"
    acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, settings={"method": "acdc", "seed": 0}, max_tests=3)
    with pytest.raises(ValueError, match="--seed was 0, now 1"):
        acdc_mod.acdc(setup, 1e-5, checkpoint=ckpt, resume=True, settings={"method": "acdc", "seed": 1})
    with pytest.raises(ValueError, match="--tau was 1e-05, now 2e-05"):
        acdc_mod.acdc(setup, 2e-5, checkpoint=ckpt, resume=True, settings={"method": "acdc", "seed": 0})
    with pytest.raises(ValueError, match="--acdc-metric was 'kl', now 'logit-diff'"):
        acdc_mod.acdc(setup, 1e-5, metric=Metric.LOGIT_DIFF, checkpoint=ckpt, resume=True,
                      settings={"method": "acdc", "seed": 0})
    other = _acdc_setup().task.subset([1, 0])
    from circuits import evaluation
    with pytest.raises(ValueError, match="task data was"):
        acdc_mod.acdc(evaluation.prepare(setup.model, other), 1e-5, checkpoint=ckpt, resume=True,
                      settings={"method": "acdc", "seed": 0})


def _discover(out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "circuits.cli.main", "discover", "random:gpt2-tiny", IOI, "--method", "acdc",
            "--tau", "1e-5", "--out", str(out), "--quiet", "--checkpoint-every", "0", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "CIRCUITS_TEST_THREADS": "1"})


def _edges(path: Path) -> dict:
    return {k: v["in_graph"] for k, v in json.loads(path.read_text())["edges"].items()}


def _kill_when_checkpointed(proc: subprocess.Popen, ckpt: Path, sig: int) -> None:
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(60)


@pytest.mark.slow
def test_sigkill_mid_acdc_then_resume_gives_the_uninterrupted_circuit(tmp_path):
    whole = tmp_path / "whole.json"
    assert _discover(whole).wait(300) == 0
    out = tmp_path / "c.json"
    proc = _discover(out)
    _kill_when_checkpointed(proc, Path(str(out) + ".ckpt.pt"), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert Path(str(out) + ".lock").exists()                 # the killed run's lock: stale
    resumed = _discover(out, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert _edges(out) == _edges(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "whole.json"]


@pytest.mark.slow
def test_sigterm_saves_the_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "c.json"
    proc = _discover(out)
    _kill_when_checkpointed(proc, Path(str(out) + ".ckpt.pt"), signal.SIGTERM)
    assert proc.returncode == 143
    err = proc.stderr.read()
    assert err.startswith("circuits: terminated; progress saved to") and err.count("\n") == 1, err
    assert not Path(str(out) + ".lock").exists() and not out.exists()


def test_an_expensive_result_that_cannot_be_written_goes_to_a_named_fallback(tmp_path, monkeypatch):
    from circuits.cli.common import rescue
    from circuits.files import OutputError, write_text
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = tmp_path / "c.json"

    def write(path):
        if Path(path) == target:
            raise OutputError(f"cannot write {path}: No space left on device")
        write_text(path, "the circuit")
    with pytest.raises(OutputError) as err:
        rescue(write, target, "the circuit")
    message = str(err.value)
    saved = Path(message.split("was saved to ")[1].split(" instead")[0])
    assert message.startswith(f"cannot write {target}: No space left on device; the circuit was saved to ")
    assert saved.parent == tmp_path / "cache" / "circuits" / "rescued" and saved.read_text() == "the circuit"

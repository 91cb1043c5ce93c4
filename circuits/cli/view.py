"""`circuits view`: the interactive HTML viewer (circuits/io/view.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from circuits.cli.common import refuse_overwriting_inputs


def check_output(path: str) -> None:
    """An output path that cannot be written is refused before any circuit is read (and before torch loads)."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; give a file name such as {out / 'circuit.html'}")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot write {out}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise ValueError(f"cannot write {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"cannot write {out}: no permission to write in {folder}")


def _report(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such report file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a JSON report (write one with `circuits verify ... --out report.json`)") from None
    if not isinstance(data, dict) or "curve" not in data:
        raise ValueError(f"{path}: has no faithfulness curve (a `circuits verify --out` report of a circuit with scores has one)")
    return data


def cmd_view(args) -> int:
    if len(args.report) > len(args.circuits):
        raise ValueError(f"{len(args.report)} --report files for {len(args.circuits)} circuits; give at most one per circuit, in order")
    check_output(args.output)
    refuse_overwriting_inputs(args.circuits + args.report, [args.output])
    from circuits.cli.common import plural
    from circuits.io import view
    reports = [_report(p) for p in args.report] + [None] * (len(args.circuits) - len(args.report))
    named = view.load_named(args.circuits)
    data = view.page_data(named, align=args.align, reports=reports, max_drawn=args.max_drawn, title=args.title)
    out = view.write_html(view.to_html(data), args.output)
    size = out.stat().st_size
    what = ", ".join(f"{n.name} ({plural(n.circuit.n_edges, 'edge')})" for n in named)
    print(f"wrote {out} ({size / 1e6:.1f} MB, {data['mode']}): {what}")
    for note in data["notes"]:
        print(f"note: {note}")
    if args.open:
        import webbrowser
        webbrowser.open(out.resolve().as_uri())
    return 0


def add_view(sub, add_common) -> None:
    from circuits.cli.common import positive_int
    p = sub.add_parser(
        "view", help="interactive HTML viewer of one or more circuits (one self-contained file)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  circuits view circuit.json -o circuit.html --open\n"
               "  circuits view eap.json acdc.json -o overlay.html          # shared / only-in-A / only-in-B\n"
               "  circuits verify circuit.json induction-2l induction --out report.json\n"
               "  circuits view circuit.json --report report.json           # faithfulness at each slider size\n\n"
               "The page works offline (its JavaScript is inlined). Slider: top-n edges by |score|,\n"
               "pruned to input->logits paths as discovery does; hover for details, click a node for\n"
               "its paths, search by name or head role.")
    p.add_argument("circuits", nargs="+", metavar="CIRCUIT", help="circuits JSON files (two or more: overlay)")
    p.add_argument("-o", "--output", default="circuit.html", help="the HTML file to write (default circuit.html)")
    p.add_argument("--open", action="store_true", help="open it in the web browser")
    p.add_argument("--align", action="store_true",
                   help="view circuits of different models together (same shape: by edge name; else side by side "
                        "by relative depth)")
    p.add_argument("--report", action="append", default=[], metavar="REPORT.json",
                   help="a `circuits verify --out` report per circuit, in order: its faithfulness curve")
    p.add_argument("--max-drawn", type=positive_int, default=12000,
                   help="draw at most this many edges, strongest first; the page says what it hides (default 12000)")
    p.add_argument("--title")
    p.set_defaults(func=cmd_view)

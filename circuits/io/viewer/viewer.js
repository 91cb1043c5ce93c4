/* The circuit viewer's page script: reads the JSON that circuits/io/view.py embedded, draws it
 * with sigma.js on a graphology graph, and answers the controls. Exposes window.circuitView for
 * scripts and tests (counts, the current selection, the highlighted paths). */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("circuit-data").textContent);
  const $ = (id) => document.getElementById(id);
  const KIND_COLOUR = { input: "#718096", logits: "#718096", head: "#4299e1", mlp: "#ed8936" };
  const PORT_COLOUR = { q: "#805ad5", k: "#38a169", v: "#d69e2e" };
  const CONTEXT_COLOUR = "#e2e8f0";
  // sigma blends as premultiplied alpha (ONE, ONE_MINUS_SRC_ALPHA) but hands colours to WebGL as
  // given: a translucent colour must come premultiplied, else blue fades to cyan and red to pink
  const rgba = (rgb, alpha) => `rgba(${rgb.split(",").map((v) => Math.round(v * alpha)).join(",")},${alpha})`;
  const FADED = rgba("203,213,224", 0.25);
  const OVERLAY_COLOUR = { shared: "#2f855a", a: "#3182ce", b: "#d53f8c" };
  const MAX_DRAWN = DATA.max_drawn;
  // The strongest edges (by rank) are drawn thick, width by |score|, and answer hover; the rest
  // as 1-px lines, left out of sigma's picking pass (which draws every pickable edge into an
  // offscreen WebGL texture: without a GPU, SwiftShader spends ~10 ms on 1,000 of them).
  const THICK = 1000;
  const SIDE = DATA.mode === "side-by-side";

  // ---- numbers -------------------------------------------------------------------------------
  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e-3 && a < 1e5 ? String(Number(x.toPrecision(4))) : x.toExponential(3);
  }
  const plural = (n, word) => `${n.toLocaleString("en-US")} ${word}${n === 1 ? "" : /(ch|sh|s|x)$/.test(word) ? "es" : "s"}`;
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

  // ---- per-layout tables ---------------------------------------------------------------------
  // A position-aware circuit (edges s@p->r@p) draws every node once per position: positions as
  // columns (each a copy of the head columns), layers as rows.
  const layouts = DATA.layouts.map((L, li) => {
    const receiversOfNode = L.nodes.map(() => []);
    L.receivers.forEach((rec, r) => rec.targets.forEach((t) => receiversOfNode[t].push(r)));
    const positions = L.positions || null;
    const colWidth = Math.max(...L.nodes.map((n) => n.x)) + 1 + (positions ? 0.8 : 0);
    return { ...L, li, receiversOfNode, positions, P: positions ? positions.length : 1, colWidth };
  });
  const layoutOf = (ci) => layouts[SIDE ? ci : 0];
  const at = (L, p) => (L.positions ? `@${L.positions[p]}` : "");
  const nodeKey = (li, id, p = 0) => `${SIDE ? li + "/" : ""}${id}${at(layouts[li], p)}`;
  const portKey = (li, r, p = 0) => `${SIDE ? li + "/" : ""}port:${r}${at(layouts[li], p)}`;

  // y: layers (relative depth when side by side); x: heads (in a column per position), spread so the rows fill the screen
  const yMax = Math.max(...layouts.map((L) => L.arch.n_layers));
  const widths = layouts.map((L) => L.P * L.colWidth - (L.positions ? 0.8 : 0) + 1.3 + 1.4);   // row labels at x = -1.3
  const box = document.getElementById("graph");
  const aspect = Math.max(0.5, (box.clientWidth || 1000) / Math.max(1, box.clientHeight || 700));
  const span = widths.reduce((a, b) => a + b, 0) + 1.5 * (widths.length - 1);
  const yRows = yMax + 1 + (layouts.some((L) => L.positions) ? 0.7 : 0);     // + the column labels
  const xSpread = Math.min(8, Math.max(1, 0.92 * aspect * yRows / span));
  // too wide even unspread (many positions or heads): spread the rows instead, to fill the screen
  const ySpread = Math.max(1, span * xSpread / (0.92 * aspect * yRows));
  function place(L, x, y, p = 0) {
    const yScale = (SIDE ? yMax / L.arch.n_layers : 1) * ySpread;
    const xOffset = SIDE ? widths.slice(0, L.li).reduce((a, b) => a + b + 1.5, 0) : 0;
    return { x: (x + p * L.colWidth + xOffset) * xSpread, y: (y + 1) * yScale };
  }

  // ---- graph ---------------------------------------------------------------------------------
  const graph = new graphology.MultiDirectedGraph();
  const base = graph;
  layouts.forEach((L) => {
    for (let p = 0; p < L.P; p++) {
      L.nodes.forEach((n, i) => {
        const xy = place(L, n.x, n.y, p);
        base.addNode(nodeKey(L.li, n.id, p), {
          x: xy.x, y: xy.y, size: 3, color: KIND_COLOUR[n.kind], kind: n.kind, li: L.li, index: i, pos: p,
          label: L.positions ? n.id + at(L, p) : n.role ? `${n.id} · ${n.role}` : n.id,   // many columns: short labels
        });
      });
      L.receivers.forEach((rec, r) => {
        if (!rec.port) return;
        const xy = place(L, rec.port[0], rec.port[1], p);
        base.addNode(portKey(L.li, r, p), { x: xy.x, y: xy.y, size: 2.4, color: PORT_COLOUR[rec.channel], kind: "port",
                                            li: L.li, receiver: r, pos: p, label: null });
      });
      if (L.positions) {                                          // column labels under the input row
        const xy = place(L, (L.colWidth - 1.8) / 2, -1.6, p);
        base.addNode(`${SIDE ? L.li + "/" : ""}col:${p}`, { x: xy.x, y: xy.y, size: 0.01, color: "#fff", kind: "row", pos: p,
                                                           label: `pos ${L.positions[p]}`, forceLabel: true });
      }
    }
    const right = place(L, L.P * L.colWidth - (L.positions ? 0.8 : 0) + 0.4, 0);   // room for the last column's labels
    base.addNode(`${SIDE ? L.li + "/" : ""}row:margin`, { x: right.x, y: right.y, size: 0.01, color: "#fff", kind: "row", label: null });
    for (let layer = 0; layer < L.arch.n_layers; layer++) {      // row labels on the left
      const xy = place(L, -1.3, layer);
      base.addNode(`${SIDE ? L.li + "/" : ""}row:${layer}`, { x: xy.x, y: xy.y, size: 0.01, color: "#fff", kind: "row",
                                                            label: `layer ${layer}`, forceLabel: true });
    }
  });
  const allNodes = graph.nodes();

  // ---- state ---------------------------------------------------------------------------------
  const circuits = DATA.circuits;
  // largest |score| of each circuit: edge widths and opacities are relative to it, so an edge's
  // look does not depend on what else is drawn and a redraw touches only the edges that change
  const maxAbs = circuits.map((c) => (c.edges.score ? c.edges.score.reduce((m, x) => Math.max(m, Math.abs(x)), 0) : 0));
  const view = {
    circuit: 0, mode: "saved", n: circuits[0].n_edges, prune: true,
    overlay: DATA.mode !== "single" && !SIDE, a: 0, b: 1,
    focus: null, focusNodes: null, focusEdges: null, matches: null,
    drawn: [], drawnKeys: new Map(), hidden: 0, selected: 0, circuitNodes: new Set(), usedPorts: new Set(),
    indexedNodes: new Set(),   // circuit nodes when sigma last indexed the graph (placed their labels)
    firstFrameMs: null, lastRedrawMs: null, pendingSince: null, inputAt: null, lastJsMs: null, lastRefresh: null,
  };

  // ---- edges of the ranked lists -------------------------------------------------------------
  // d: {ci, i, key, member?}: edge i of circuit ci's ranked list
  function ends(d) {
    const c = circuits[d.ci], L = layoutOf(d.ci), E = c.edges;
    const p = E.p ? E.p[d.i] : 0, r = E.r[d.i], rec = L.receivers[r];
    return { c, L, p, s: E.s[d.i], r, rec,
             source: nodeKey(L.li, L.nodes[E.s[d.i]].id, p),
             target: rec.port ? portKey(L.li, r, p) : nodeKey(L.li, L.nodes[rec.targets[0]].id, p) };
  }
  function edgeName(d) {
    const e = ends(d), tag = at(e.L, e.p);
    return `${e.L.nodes[e.s].id}${tag}->${e.rec.name}${tag}`;
  }

  // ---- selection: the saved mask, or the top n by |score| pruned like select.prune -----------
  function savedSelection(c) {
    const out = [];
    const inGraph = c.edges.in;
    for (let i = 0; i < inGraph.length; i++) if (inGraph[i]) out.push(i);
    return out;
  }

  // Position-aware edges prune as select.prune does them: by the edges kept at any position.
  function prune(c, L, ranks) {
    const S = L.n_senders, E = c.edges;
    const live = new Uint8Array(S); live[0] = 1;
    const into = L.nodes.map(() => []);           // per node: senders of selected edges into it
    const from = Array.from({ length: S }, () => []);
    for (const i of ranks) {
      const s = E.s[i], r = E.r[i];
      for (const t of L.receivers[r].targets) into[t].push(s);
      from[s].push(r);
    }
    for (let s = 1; s < S; s++) {                  // senders are in topological order
      for (const u of into[s]) if (live[u]) { live[s] = 1; break; }
    }
    const recvReaches = new Uint8Array(L.receivers.length);
    recvReaches[L.logits_col] = 1;
    for (let s = S - 1; s >= 0; s--) {
      let reaches = false;
      for (const r of from[s]) if (recvReaches[r]) { reaches = true; break; }
      if (reaches) for (const r of L.receiversOfNode[s]) recvReaches[r] = 1;
    }
    return ranks.filter((i) => live[E.s[i]] && recvReaches[E.r[i]]);
  }

  function topSelection(c, L, n) {
    const ranks = [];
    for (let i = 0; i < Math.min(n, c.edges.s.length); i++) ranks.push(i);
    return view.prune ? prune(c, L, ranks) : ranks;
  }

  // ---- drawing -------------------------------------------------------------------------------
  // One graph for the page's lifetime. An edge enters it the first time it is drawn and stays;
  // what is drawn now is view.drawnKeys, applied by the reducers. A redraw that adds no edge to
  // the graph re-reduces only the edges whose drawn state changed (sigma's partial refresh);
  // adding edges re-indexes the graph once. (Swapping the graph bound to sigma re-indexes it edge
  // by edge, several times slower.)
  const RGB = { pos: "43,108,176", neg: "197,48,48", none: "85,85,85", shared: "47,133,90", a: "49,130,206", b: "213,63,140" };
  function edgeColour(score, rel, member, strong, thin) {
    // opacity by |score| so that the strongest edges stand out of a dense circuit; the thin
    // (weaker) ones fainter still, so that thousands of them stay a backdrop
    const alpha = (strong ? 0.5 + 0.5 * rel : thin ? 0.12 + 0.88 * rel : 0.4 + 0.6 * rel).toFixed(2);
    const rgb = member ? RGB[member] : score === null ? RGB.none : score >= 0 ? RGB.pos : RGB.neg;
    return rgba(rgb, alpha);
  }

  // Adds the edge (and its port's links) to the graph unless there; true when it added it.
  function ensureEdge(d, rank) {
    if (graph.hasEdge(d.key)) return false;
    const e = ends(d);
    const score = e.c.edges.score ? e.c.edges.score[d.i] : null;
    const rel = score === null || !maxAbs[d.ci] ? 0.5 : Math.abs(score) / maxAbs[d.ci];
    const member = d.member || null;                 // an edge's look is fixed: the reducer only picks one
    const thin = rank >= THICK;
    graph.addEdgeWithKey(d.key, e.source, e.target, { ci: d.ci, i: d.i, score, rel, member,
                                                      type: thin ? "line" : "rect", size: 0.6 + 3.4 * rel,
                                                      color: edgeColour(score, rel, member, false, thin), strong: edgeColour(score, rel, member, true, thin),
                                                      zIndex: member === "shared" ? 1 : 0 });
    if (e.rec.port && !graph.hasEdge(`link:${e.target}:${e.rec.targets[0]}`)) {
      for (const t of e.rec.targets) {
        graph.addEdgeWithKey(`link:${e.target}:${t}`, e.target, nodeKey(e.L.li, e.L.nodes[t].id, e.p),
                             { link: true, type: "line", size: 0.8, color: rgba("160,174,192", 0.9) });
      }
    }
    return true;
  }

  function drawSelection(list) {
    // list: [{ci, i, key, member?}], strongest first
    view.selected = list.length;
    const drawn = list.length > MAX_DRAWN ? list.slice(0, MAX_DRAWN) : list;
    view.hidden = list.length - drawn.length;
    view.drawn = drawn;
    const before = view.drawnKeys, portsBefore = view.usedPorts;
    // While edges are added sigma's graph listeners are off: one refresh afterwards is cheaper
    // than its per-edge updates (unbind/bindGraphHandlers: sigma 3.0's own, used by setGraph).
    const quiet = renderer && typeof renderer.unbindGraphHandlers === "function";
    if (quiet) renderer.unbindGraphHandlers();
    let reindex = false;
    // Hidden edges still cost a reducer pass and a slot in the drawing buffers: start afresh when they dominate.
    if (graph.size > 3 * drawn.length + 3000 && graph.size > 2 * MAX_DRAWN + 3000) { graph.clearEdges(); reindex = true; }
    view.drawnKeys = new Map();
    view.circuitNodes = new Set();
    view.usedPorts = new Set();
    drawn.forEach((d, rank) => {
      if (ensureEdge(d, d.member ? rank : d.i)) reindex = true;      // a circuit's own edges: by their rank in it
      view.drawnKeys.set(d.key, d.member || null);
      const e = ends(d);
      view.circuitNodes.add(e.source);
      for (const t of e.rec.targets) view.circuitNodes.add(nodeKey(e.L.li, e.L.nodes[t].id, e.p));
      if (e.rec.port) view.usedPorts.add(e.target);
    });
    if (quiet) renderer.bindGraphHandlers();
    // node sizes by importance, within what is drawn
    view.nodeSize = new Map();
    layouts.forEach((L) => {
      const c = circuits[SIDE ? L.li : view.circuit];
      let max = 0;
      for (let p = 0; p < L.P; p++) {
        L.nodes.forEach((n, i) => { if (c.node_scores && view.circuitNodes.has(nodeKey(L.li, n.id, p))) max = Math.max(max, nodeScore(c, L, i, p)); });
      }
      for (let p = 0; p < L.P; p++) {
        L.nodes.forEach((n, i) => {
          const key = nodeKey(L.li, n.id, p);
          if (view.circuitNodes.has(key)) view.nodeSize.set(key, 4 + 6 * (c.node_scores && max > 0 ? Math.sqrt(nodeScore(c, L, i, p) / max) : 0.5));
        });
      }
    });
    // What the renderer must redo: everything (after new edges), or only the edges that changed.
    if (reindex) view.changed = null;
    else {
      const edges = [];
      for (const k of view.drawnKeys.keys()) if (!before.has(k)) edges.push(k);
      for (const k of before.keys()) if (!view.drawnKeys.has(k) && graph.hasEdge(k)) edges.push(k);
      for (const port of portsBefore) if (!view.usedPorts.has(port)) graph.forEachOutEdge(port, (k) => { edges.push(k); });
      for (const port of view.usedPorts) if (!portsBefore.has(port)) graph.forEachOutEdge(port, (k) => { edges.push(k); });
      view.changed = edges;
    }
    if (view.focus) { view.changed = null; clearFocus(false); }
    updateStatus();
  }

  function redraw() {
    const started = performance.now();
    // from the slider's input event when it asked for this redraw, else from now
    view.pendingSince = view.inputAt !== null ? view.inputAt : view.pendingSince !== null ? view.pendingSince : started;
    view.inputAt = null;
    if (SIDE) {
      const list = [];
      circuits.forEach((c, ci) => savedSelection(c).forEach((i) => list.push({ ci, i, key: `e${ci}:${i}` })));
      list.sort((x, y) => x.i - y.i);
      drawSelection(list);
    } else if (view.overlay) {
      drawSelection(overlaySelection());
    } else {
      const c = circuits[view.circuit], L = layoutOf(view.circuit);
      const ranks = view.mode === "saved" ? savedSelection(c) : topSelection(c, L, view.n);
      drawSelection(ranks.map((i) => ({ ci: view.circuit, i, key: `e${view.circuit}:${i}` })));
    }
    if (renderer) {
      if (view.changed === null || view.changed.length) refresh(view.changed);
      else markFrame();                              // nothing to redraw (e.g. above the cap): only the status changed
    }
    view.lastJsMs = performance.now() - started;   // selection, pruning, sigma's refresh; not the rasterizing
  }

  // A full refresh (edges: null) or one of these edges and every node.
  function refresh(edges) {
    view.lastRefresh = edges === null ? "full" : edges.length;
    if (edges === null) { view.indexedNodes = new Set(view.circuitNodes); renderer.refresh(); }
    else renderer.refresh({ partialGraph: { nodes: allNodes, edges }, skipIndexation: true });
  }

  function nodeScore(c, L, i, p) {
    return !c.node_scores ? null : L.positions ? c.node_scores[p][i] : c.node_scores[i];
  }

  // ---- overlay -------------------------------------------------------------------------------
  function edgeIds(c, L) {
    const R = L.receivers.length, SR = L.n_senders * R, m = new Map();
    for (const i of savedSelection(c)) m.set((c.edges.p ? c.edges.p[i] * SR : 0) + c.edges.s[i] * R + c.edges.r[i], i);
    return m;
  }

  function overlaySelection() {
    const L = layouts[0], A = circuits[view.a], B = circuits[view.b];
    const ea = edgeIds(A, L), eb = edgeIds(B, L);
    const list = [];
    const pair = `o${view.a}-${view.b}:`;            // an edge's look depends on the pair compared
    for (const [id, i] of ea) list.push({ ci: view.a, i, key: pair + id, member: eb.has(id) ? "shared" : "a", id });
    for (const [id, i] of eb) if (!ea.has(id)) list.push({ ci: view.b, i, key: pair + id, member: "b", id });
    const strength = (d) => { const sc = circuits[d.ci].edges.score; return sc ? Math.abs(sc[d.i]) : 0; };
    list.sort((x, y) => strength(y) - strength(x));
    return list;
  }

  function overlayFigures() {
    const L = layouts[0], A = circuits[view.a], B = circuits[view.b];
    const ea = edgeIds(A, L), eb = edgeIds(B, L);
    let shared = 0;
    for (const id of ea.keys()) if (eb.has(id)) shared++;
    const union = ea.size + eb.size - shared;
    const comps = (c) => {
      const s = new Set();
      for (const i of savedSelection(c)) {
        s.add(c.edges.s[i]);
        for (const t of L.receivers[c.edges.r[i]].targets) s.add(t);
      }
      s.delete(0); s.delete(L.nodes.length - 1);
      return s;
    };
    const na = comps(A), nb = comps(B);
    let sharedNodes = 0;
    for (const x of na) if (nb.has(x)) sharedNodes++;
    const nodeUnion = na.size + nb.size - sharedNodes;
    return { shared, onlyA: ea.size - shared, onlyB: eb.size - shared,
             jaccard: union ? shared / union : 1, nodeJaccard: nodeUnion ? sharedNodes / nodeUnion : 1 };
  }

  // ---- focus: a node's ancestors and descendants within what is drawn -----------------------
  // At position grain an edge into a head's k or v at position p reaches that head at p and at
  // every later position (causal attention reads earlier keys and values); q, MLP and logits
  // inputs stay at their position.
  function drawnNodeGraph() {
    const succ = new Map(), pred = new Map();
    const push = (m, k, v) => { if (!m.has(k)) m.set(k, []); m.get(k).push(v); };
    for (const d of view.drawn) {
      const e = ends(d);
      const last = e.L.positions && (e.rec.channel === "k" || e.rec.channel === "v") ? e.L.P - 1 : e.p;
      for (const t of e.rec.targets) {
        for (let q = e.p; q <= last; q++) {
          const tk = nodeKey(e.L.li, e.L.nodes[t].id, q);
          push(succ, e.source, tk); push(pred, tk, e.source);
        }
      }
    }
    return { succ, pred };
  }

  function reach(start, adj) {
    const seen = new Set(), stack = [start];
    while (stack.length) {
      const x = stack.pop();
      for (const y of adj.get(x) || []) if (!seen.has(y)) { seen.add(y); stack.push(y); }
    }
    return seen;
  }

  function focusOn(key) {
    if (!graph.hasNode(key) || !view.circuitNodes.has(key)) { clearFocus(true); return; }
    const { succ, pred } = drawnNodeGraph();
    const anc = reach(key, pred), desc = reach(key, succ);
    const up = new Set([...anc, key]), down = new Set([...desc, key]);
    const edges = new Set(), ports = new Set();
    for (const d of view.drawn) {
      const e = ends(d);
      const last = e.L.positions && (e.rec.channel === "k" || e.rec.channel === "v") ? e.L.P - 1 : e.p;
      let onPath = down.has(e.source);
      for (const t of e.rec.targets) for (let q = e.p; q <= last && !onPath; q++) onPath = up.has(nodeKey(e.L.li, e.L.nodes[t].id, q));
      if (onPath) {
        edges.add(d.key);
        if (e.rec.port) ports.add(e.target);
      }
    }
    view.focus = key;
    view.focusNodes = new Set([...anc, ...desc, key]);
    view.focusAncestors = anc;
    view.focusDescendants = desc;
    view.focusEdges = edges;
    view.focusPorts = ports;
    showNode(key, true);
    if (renderer) refresh(null);
  }

  function clearFocus(redrawNow) {
    view.focus = view.focusNodes = view.focusEdges = view.focusPorts = null;
    view.focusAncestors = view.focusDescendants = null;
    if (redrawNow && renderer) refresh(null);
  }

  // ---- details -------------------------------------------------------------------------------
  function nodeInfo(key) {
    const a = graph.getNodeAttributes(key);
    const L = layouts[a.li], n = L.nodes[a.index];
    const ci = SIDE ? a.li : view.circuit;
    const c = circuits[ci];
    const rows = [["node", `<b>${esc(n.id)}</b>`], ["kind", n.kind]];
    if (n.layer >= 0 && n.kind !== "logits") rows.push(["layer", n.layer]);
    if (n.head !== undefined) rows.push(["head", n.head]);
    if (n.kv_group) rows.push(["KV group", `kv${n.kv_group.group} (${n.kv_group.heads.join(", ")})`]);
    if (L.positions) rows.push(["position", esc(L.positions[a.pos])]);
    if (n.role) rows.push(["role", `<b>${esc(n.role)}</b>`]);
    for (const [k, v] of Object.entries(n)) {
      if (["id", "kind", "layer", "head", "x", "y", "kv_group", "role"].includes(k)) continue;
      rows.push([k.replace(/_/g, " "), esc(typeof v === "object" ? JSON.stringify(v) : typeof v === "number" ? fmt(v) : v)]);
    }
    if (c.node_scores) rows.push(["score", `<span class="node-score">${fmt(nodeScore(c, L, a.index, a.pos))}</span> <span class="muted">(summed |score| of its edges out${L.positions ? " at this position" : ""}${n.kind === "logits" ? "; in, for the logits" : ""})</span>`]);
    if (!view.circuitNodes.has(key)) rows.push(["", '<span class="muted">not in the drawn circuit</span>']);
    else {
      let nin = 0, nout = 0;
      const count = (k) => view.drawnKeys.has(k);
      graph.forEachInEdge(key, (e) => { if (count(e)) nin++; });
      graph.forEachOutEdge(key, (e) => { if (count(e)) nout++; });
      if (L.nodes[a.index].kind === "head") {       // edges into its q/k/v ports
        L.receiversOfNode[a.index].forEach((r) => {
          const pk = portKey(L.li, r, a.pos);
          if (graph.hasNode(pk)) graph.forEachInEdge(pk, (e) => { if (count(e)) nin++; });
        });
      }
      rows.push(["drawn edges", `${nin} in, ${nout} out`]);
    }
    return rows;
  }

  function edgeInfo(key) {
    const a = graph.getEdgeAttributes(key);
    if (a.link) return null;
    const c = circuits[a.ci], L = layoutOf(a.ci);
    const s = c.edges.s[a.i], r = c.edges.r[a.i], rec = L.receivers[r];
    const name = edgeName({ ci: a.ci, i: a.i });
    const rows = [["edge", `<b>${esc(name)}</b>`], ["into", rec.channel + (rec.kv_group !== undefined ? ` of KV group ${rec.kv_group} (${rec.targets.map((t) => L.nodes[t].id).join(", ")})` : "")]];
    if (a.member) {
      const ids = [view.a, view.b].map((ci) => edgeIds(circuits[ci], L));
      const id = (c.edges.p ? c.edges.p[a.i] * L.n_senders * L.receivers.length : 0) + s * L.receivers.length + r;
      rows.push(["in", a.member === "shared" ? "both circuits" : `only ${circuits[a.member === "a" ? view.a : view.b].name}`]);
      [view.a, view.b].forEach((ci, k) => {
        const sc = circuits[ci].edges.score;
        if (sc && ids[k].has(id)) rows.push([`score (${esc(circuits[ci].name)})`, fmt(sc[ids[k].get(id)])]);
      });
    } else {
      if (c.edges.score) rows.push(["score", `<span class="edge-score">${fmt(c.edges.score[a.i])}</span>`]);
      if (c.has_scores) rows.push(["rank by |score|", `${(a.i + 1).toLocaleString("en-US")} of ${c.edges.s.length.toLocaleString("en-US")}`]);
      rows.push(["in saved circuit", c.edges.in[a.i] ? "yes" : "no"]);
    }
    return rows;
  }

  const table = (rows) => `<table>${rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("")}</table>`;

  function showNode(key, sticky) {
    const a = graph.getNodeAttributes(key);
    if (a.kind === "port") {
      const L = layouts[a.li], rec = L.receivers[a.receiver];
      $("details").innerHTML = table([["input", `<b>${esc(rec.name + at(L, a.pos))}</b>`], ["feeds", rec.targets.map((t) => esc(L.nodes[t].id + at(L, a.pos))).join(", ")],
                                      ["drawn edges in", graph.inEdges(key).filter((e) => view.drawnKeys.has(e)).length]]);
      return;
    }
    if (a.kind === "row") return;
    $("details").innerHTML = table(nodeInfo(key)) + (view.focus && view.focus === key
      ? `<div class="muted">highlighted: ${plural(view.focusAncestors.size, "ancestor")}, ${plural(view.focusDescendants.size, "descendant")}, ${plural(view.focusEdges.size, "edge")}</div>` : "");
  }

  // ---- status, curve, legend -----------------------------------------------------------------
  function curveText(c, n) {
    if (!c.curve) return "";
    const pts = c.curve;
    const hit = pts.find((p) => p.edges === n);
    if (hit) return `faithfulness <b>${fmt(hit.faithfulness)}</b> at top ${n.toLocaleString("en-US")} (measured)`;
    const lo = [...pts].reverse().find((p) => p.edges < n), hi = pts.find((p) => p.edges > n);
    const part = (p) => `${fmt(p.faithfulness)} at ${p.edges.toLocaleString("en-US")}`;
    if (lo && hi) return `faithfulness between ${part(lo)} and ${part(hi)} edges (curve points; not measured at this size)`;
    return `faithfulness ${part(lo || hi)} edges (nearest curve point)`;
  }

  function drawCurve(c, n) {
    const box = $("curve");
    if (!c.curve || view.overlay || SIDE) { box.hidden = true; return; }
    box.hidden = false;
    const pts = c.curve.filter((p) => p.edges > 0);
    if (!pts.length) { box.hidden = true; return; }
    const W = 280, H = 70, pad = 6;
    const lx = (e) => Math.log10(Math.max(1, e));
    const x0 = 0, x1 = Math.max(lx(c.edges.s.length), ...pts.map((p) => lx(p.edges)));
    const fs = pts.map((p) => p.faithfulness);
    const y0 = Math.min(0, ...fs), y1 = Math.max(1, ...fs);
    const X = (e) => pad + (W - 2 * pad) * (lx(e) - x0) / (x1 - x0 || 1);
    const Y = (f) => H - pad - (H - 2 * pad) * (f - y0) / (y1 - y0 || 1);
    const line = pts.map((p) => `${X(p.edges).toFixed(1)},${Y(p.faithfulness).toFixed(1)}`).join(" ");
    box.innerHTML = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" aria-label="faithfulness curve">
      <line x1="${pad}" x2="${W - pad}" y1="${Y(1)}" y2="${Y(1)}" stroke="#cbd5e0" stroke-dasharray="3,3"/>
      <polyline points="${line}" fill="none" stroke="#2b6cb0" stroke-width="1.5"/>
      ${pts.map((p) => `<circle class="pt" cx="${X(p.edges).toFixed(1)}" cy="${Y(p.faithfulness).toFixed(1)}" r="2"><title>${p.edges} edges: ${fmt(p.faithfulness)}</title></circle>`).join("")}
      <line x1="${X(n)}" x2="${X(n)}" y1="0" y2="${H}" stroke="#d53f8c" stroke-width="1.5"/></svg>
      <div class="muted">faithfulness vs top-n edges (log scale); dashed: 1</div>`;
  }

  function updateStatus() {
    const st = $("status");
    const edges = view.drawn.length;
    const nodes = [...view.circuitNodes].length;
    st.dataset.edges = edges; st.dataset.nodes = nodes; st.dataset.hidden = view.hidden;
    st.dataset.n = view.n; st.dataset.mode = view.overlay ? "overlay" : SIDE ? "side-by-side" : view.mode;
    let html = `drawn: <b>${plural(edges, "edge")}</b>, <b>${plural(nodes, "node")}</b>`;
    const c = circuits[view.circuit];
    if (!view.overlay && !SIDE) {
      if (view.mode === "saved") {
        html += `<br>the circuit as saved${c.faithfulness !== null ? `: faithfulness <b>${fmt(c.faithfulness)}</b>` : ""}`;
      } else {
        const pruned = view.prune ? Math.min(view.n, c.edges.s.length) - view.selected : 0;
        html += `<br>top ${view.n.toLocaleString("en-US")} by |score|${pruned > 0 ? `, ${plural(pruned, "edge")} pruned off input→logits paths` : ""}`;
        const ct = curveText(c, view.n);
        if (ct) html += `<br>${ct}`;
      }
    }
    if (edges > THICK) html += `<br><span class="muted">edge hover: the ${THICK.toLocaleString("en-US")} strongest edges (drawn thick); for the thin ones hover or click their nodes, or lower the size</span>`;
    st.innerHTML = html;
    const note = $("hidden-note");
    note.hidden = view.hidden === 0;
    note.textContent = view.hidden ? `${view.hidden.toLocaleString("en-US")} weaker edges of ${view.selected.toLocaleString("en-US")} are not drawn (at most ${MAX_DRAWN.toLocaleString("en-US")} are drawn, strongest first); nodes and counts cover the drawn ones` : "";
    if (view.overlay) {
      const f = overlayFigures();
      st.innerHTML += `<div id="overlay-figures" data-shared="${f.shared}" data-only-a="${f.onlyA}" data-only-b="${f.onlyB}" data-jaccard="${f.jaccard}">
        shared <b>${f.shared}</b>, only in ${esc(circuits[view.a].name)} <b>${f.onlyA}</b>, only in ${esc(circuits[view.b].name)} <b>${f.onlyB}</b><br>
        edge Jaccard <b>${f.jaccard.toFixed(3)}</b>, component Jaccard ${f.nodeJaccard.toFixed(3)}</div>`;
    }
    drawCurve(c, view.mode === "saved" ? c.n_edges : view.n);
  }

  function buildLegend() {
    const sw = (colour, text, cls = "swatch") => `<div><span class="${cls}" style="background:${colour}"></span>${text}</div>`;
    let html = "<h2>Legend</h2>";
    html += sw(KIND_COLOUR.head, "attention head (size: importance)") + sw(KIND_COLOUR.mlp, "MLP") + sw(KIND_COLOUR.input, "input / logits");
    html += sw(PORT_COLOUR.q, "q input", "swatch") + sw(PORT_COLOUR.k, "k input") + sw(PORT_COLOUR.v, "v input");
    if (view.overlay) {
      html += sw(OVERLAY_COLOUR.shared, "edge in both", "line") + sw(OVERLAY_COLOUR.a, `edge only in ${esc(circuits[view.a].name)}`, "line") +
        sw(OVERLAY_COLOUR.b, `edge only in ${esc(circuits[view.b].name)}`, "line");
    } else {
      html += sw("rgb(43,108,176)", "edge with positive score (supports the behaviour)", "line") +
        sw("rgb(197,48,48)", "edge with negative score (works against it)", "line");
      html += '<div class="muted">edge width and opacity: |score|</div>';
    }
    html += '<div class="muted">rows: layers, input at the bottom, logits on top; edges run upwards into the q/k/v inputs under each head' +
      (layouts[0].arch.grouped ? " (k/v under the middle of their KV group, linked to its heads)" : "") +
      (layouts.some((L) => L.positions) ? "; columns: token positions, every node once per position (an edge s@p→r@p stays at " +
        "its position; attention carries what enters a head's k/v at p on to later positions)" : "") + "</div>";
    const src = layouts.map((L) => L.roles_source).filter(Boolean);
    html += `<div class="muted">${src.length ? "head roles from " + esc(src.join("; ")) : "no head roles in the circuit file"}</div>`;
    $("legend").innerHTML = html;
  }

  // ---- controls ------------------------------------------------------------------------------
  const totalRanked = () => circuits[view.circuit].edges.s.length;
  const sliderToN = (v) => Math.max(1, Math.round(Math.exp(Math.log(totalRanked()) * v / 1000)));
  const nToSlider = (n) => Math.round(1000 * Math.log(Math.max(1, n)) / Math.log(Math.max(2, totalRanked())));

  function setTopN(n) {
    view.mode = "top";
    view.n = Math.max(1, Math.min(Math.round(n), totalRanked()));
    $("mode-top").checked = true;
    $("topn").value = view.n;
    $("slider").value = nToSlider(view.n);
    redraw();
  }

  function setSaved() {
    view.mode = "saved";
    $("mode-saved").checked = true;
    view.n = circuits[view.circuit].n_edges;
    $("topn").value = view.n;
    $("slider").value = nToSlider(view.n);
    redraw();
  }

  function syncControls() {
    const c = circuits[view.circuit];
    const scored = c.has_scores && !view.overlay && !SIDE;
    for (const id of ["slider", "topn", "mode-top", "prune", "mode-saved"]) $(id).disabled = !scored;
    $("saved-n").textContent = plural(c.n_edges, "edge");
    $("topn").max = totalRanked();
    $("size").querySelector("h2").textContent = view.overlay ? "Size (the overlay compares the circuits as saved)"
      : !c.has_scores ? "Size (no scores in this file: as saved)" : "Size";
  }

  function buildTabs() {
    if (circuits.length < 2) return;
    $("which").hidden = false;
    if (SIDE) { $("tabs").innerHTML = circuits.map((c) => esc(c.name)).join(" | ") + " side by side"; return; }
    const tabs = circuits.map((c, ci) => `<label><input type="radio" name="which" value="${ci}"> ${esc(c.name)}</label>`);
    tabs.push('<label><input type="radio" name="which" value="overlay" checked> overlay</label>');
    $("tabs").innerHTML = tabs.join("");
    if (circuits.length > 2) {
      const opts = circuits.map((c, ci) => `<option value="${ci}">${esc(c.name)}</option>`).join("");
      $("overlay-pick").hidden = false;
      $("overlay-pick").innerHTML = `A <select id="pick-a">${opts}</select> B <select id="pick-b">${opts}</select>`;
      $("pick-a").value = "0"; $("pick-b").value = "1";
      $("pick-a").onchange = $("pick-b").onchange = () => { view.a = +$("pick-a").value; view.b = +$("pick-b").value; buildLegend(); redraw(); };
    }
    $("tabs").onchange = (ev) => {
      const v = ev.target.value;
      view.overlay = v === "overlay";
      if (!view.overlay) { view.circuit = +v; view.mode = "saved"; view.n = circuits[view.circuit].n_edges; $("mode-saved").checked = true; }
      syncControls(); buildLegend(); redraw();
    };
  }

  function header() {
    const c = circuits[0];
    $("title").textContent = DATA.title;
    const bits = [c.model, c.task, c.method, c.metric, c.ablation && `${c.ablation} ablation`].filter(Boolean);
    if (circuits.length === 1) bits.push(`${plural(c.n_edges, "edge")} of ${c.total_edges.toLocaleString("en-US")}`);
    $("meta").textContent = bits.join(" · ");
    $("notes").innerHTML = DATA.notes.map(esc).join("<br>");
    const names = new Set();
    layouts.forEach((L) => L.nodes.forEach((n) => { names.add(n.id); if (n.role) names.add(n.role); }));
    $("node-names").innerHTML = [...names].map((n) => `<option value="${esc(n)}">`).join("");
  }

  function search(q, jump) {
    q = q.trim().toLowerCase();
    if (!q) { view.matches = null; $("search-result").textContent = ""; refresh(null); return; }
    const found = [];
    layouts.forEach((L) => L.nodes.forEach((n) => {
      for (let p = 0; p < L.P; p++) {
        const key = nodeKey(L.li, n.id, p), k = key.toLowerCase();
        if (n.id.toLowerCase() === q || k === q || k.startsWith(q) || n.id.toLowerCase().startsWith(q) || (n.role && n.role.toLowerCase().includes(q))) found.push(key);
      }
    }));
    view.matches = new Set(found);
    $("search-result").textContent = found.length ? `${plural(found.length, "match")}: ${found.slice(0, 8).join(", ")}${found.length > 8 ? " …" : ""}` : "no node matches";
    const exact = found.find((k) => k.toLowerCase().endsWith(q)) || (found.length === 1 ? found[0] : null);
    if (jump && exact) {
      focusOn(exact);
      const d = renderer.getNodeDisplayData(exact);
      if (d) renderer.getCamera().animate({ x: d.x, y: d.y, ratio: 0.35 }, { duration: 300 });
    } else refresh(null);
  }

  // ---- renderer ------------------------------------------------------------------------------
  let renderer = null;
  // ---- edges on a 2D canvas -----------------------------------------------------------------
  // Edges are drawn on a 2D canvas under sigma's WebGL layers, by edge programs that are sigma's
  // in all but their drawing (sigma reduces, hides and orders the edges as for its own). Without
  // a GPU, Chromium draws WebGL with SwiftShader and a CPU 2D canvas with Skia, which is several
  // times faster at lines: on the real circuit's 12k-edge frame WebGL spent ~110 ms on the thin
  // lines and ~45 ms on the thick ones. The thick (strongest) edges keep sigma's WebGL picking
  // pass, into its offscreen picking texture, so that they still answer hover.
  // A CPU 2D canvas under one of sigma's WebGL layers, sized as sigma sized its layers (before
  // it made its programs). willReadFrequently: Chromium keeps such a canvas on the CPU (Skia)
  // rather than accelerating it with SwiftShader, which is slower here.
  function canvasUnder(renderer, layer) {
    const id = `${layer}Canvas`;
    if (!renderer.canvasContexts[id]) {
      const el = renderer.createCanvas(id, { beforeLayer: layer });
      const ctx = renderer.canvasContexts[id] = el.getContext("2d", { willReadFrequently: true });
      for (const side of ["width", "height"]) {
        el.style[side] = renderer[side] + "px";
        el.setAttribute(side, renderer[side] * renderer.pixelRatio + "px");
      }
      if (renderer.pixelRatio !== 1) ctx.scale(renderer.pixelRatio, renderer.pixelRatio);
    }
    return renderer.canvasContexts[id];
  }
  function edgeCanvas(renderer) {
    const fresh = !renderer.canvasContexts.edgesCanvas;
    const ctx = canvasUnder(renderer, "edges");
    // cleared with sigma's layers, so that edges hidden while the camera moves leave nothing behind
    if (fresh) renderer.on("afterClear", () => ctx.clearRect(0, 0, renderer.width, renderer.height));
    return ctx;
  }
  const straightCache = new Map();
  function straight(colour) {        // a 2D canvas takes colours unpremultiplied (see rgba above)
    let out = straightCache.get(colour);
    if (out === undefined) {
      const m = /^rgba\((\d+),(\d+),(\d+),([\d.]+)\)$/.exec(colour);
      out = m && +m[4] > 0 ? { css: `rgba(${[m[1], m[2], m[3]].map((v) => Math.min(255, Math.round(v / m[4]))).join(",")},${m[4]})`, alpha: +m[4] }
        : { css: colour, alpha: 1 };
      straightCache.set(colour, out);
    }
    return out;
  }
  // Segments by their slot in sigma's program; drawn one stroke per zIndex, colour and width,
  // by zIndex and then the fainter (weaker) first, so that the strongest edges lie on top whatever
  // their sign. (Skia blends a stroke's segments one by one where they cross, as WebGL lines do.)
  class CanvasSegments {
    constructor(renderer, thick) {
      this.ctx = edgeCanvas(renderer);
      this.thick = thick;
      this.reallocate(0);
    }
    reallocate(capacity) {
      if (capacity === this.capacity) return;
      this.capacity = capacity;
      this.xy = new Float32Array(4 * capacity);          // framed-graph coordinates of both ends
      this.size = new Float32Array(capacity);
      this.colour = new Array(capacity).fill(null);      // null: hidden
      this.z = new Int8Array(capacity);
    }
    process(edgeIndex, offset, source, target, data) {
      if (data.hidden || source.hidden || target.hidden) { this.colour[offset] = null; return; }
      this.xy.set([source.x, source.y, target.x, target.y], 4 * offset);
      this.colour[offset] = straight(data.color);
      this.size[offset] = data.size || 1;
      this.z[offset] = data.zIndex || 0;
    }
    render(params) {
      // framed graph → CSS pixels: sigma's matrix (column-major) maps to clip space
      const m = params.matrix, hw = params.width / 2, hh = params.height / 2;
      const ax = m[0] * hw, bx = m[3] * hw, cx = (m[6] + 1) * hw, ay = -m[1] * hh, by = -m[4] * hh, cy = (1 - m[7]) * hh;
      // a thick edge's width in pixels as sigma's rectangle program makes it (size / sizeRatio, at
      // least minEdgeThickness, less what its antialiasing fades out), to the nearest quarter pixel
      const perSize = 1 / params.sizeRatio, minSize = params.minEdgeThickness * params.sizeRatio;
      const fade = params.antiAliasingFeather;
      const groups = new Map();
      for (let i = 0; i < this.capacity; i++) {
        const colour = this.colour[i];
        if (colour === null) continue;
        const width = this.thick ? Math.max(0.5, Math.round(4 * (perSize * Math.max(this.size[i], minSize) - fade)) / 4) : 1;
        const key = `${this.z[i]} ${width} ${colour.css}`;
        let g = groups.get(key);
        if (!g) groups.set(key, g = { z: this.z[i], width, colour: colour.css, alpha: colour.alpha, items: [] });
        g.items.push(i);
      }
      const ctx = this.ctx, xy = this.xy;
      for (const g of [...groups.values()].sort((a, b) => a.z - b.z || a.alpha - b.alpha || a.width - b.width)) {
        ctx.strokeStyle = g.colour;
        ctx.lineWidth = g.width;
        ctx.beginPath();
        for (const i of g.items) {
          const x1 = xy[4 * i], y1 = xy[4 * i + 1], x2 = xy[4 * i + 2], y2 = xy[4 * i + 3];
          ctx.moveTo(ax * x1 + bx * y1 + cx, ay * x1 + by * y1 + cy);
          ctx.lineTo(ax * x2 + bx * y2 + cx, ay * x2 + by * y2 + cy);
        }
        ctx.stroke();
      }
    }
  }
  // The thin edges: 1-px lines, not picked.
  class CanvasLines extends CanvasSegments {
    constructor(gl, pickingBuffer, renderer) { super(renderer, false); }
    kill() {}
  }
  // The thick edges: sigma's rectangles in its picking pass only; seen on the canvas.
  class CanvasRects extends Sigma.rendering.EdgeRectangleProgram {
    constructor(gl, pickingBuffer, renderer) {
      super(gl, pickingBuffer, renderer);
      this.segments = new CanvasSegments(renderer, true);
    }
    reallocate(capacity) { super.reallocate(capacity); this.segments.reallocate(capacity); }
    process(...args) { super.process(...args); this.segments.process(...args); }
    render(params) {
      if (this.hasNothingToRender()) return;
      if (this.pickProgram) {                              // as sigma's Program.render, less its visible pass
        const down = params.pixelRatio / params.downSizingRatio;
        this.pickProgram.gl.viewport(0, 0, params.width * down, params.height * down);
        this.bindProgram(this.pickProgram);
        this.renderProgram({ ...params, pixelRatio: down }, this.pickProgram);
        this.unbindProgram(this.pickProgram);
      }
      this.segments.render(params);
    }
  }
  // Nodes likewise: sigma's circles in its picking pass only, seen on a 2D canvas (the hover
  // layer's program, without a picking pass, on one of its own). SwiftShader spent 10-25 ms a
  // frame on ~800 circles.
  class CanvasCircles extends Sigma.rendering.NodeCircleProgram {
    constructor(gl, pickingBuffer, renderer) {
      super(gl, pickingBuffer, renderer);
      this.ctx = canvasUnder(renderer, gl === renderer.webGLContexts.hoverNodes ? "hoverNodes" : "nodes");
      this.renderer = renderer;
      this.items = [];
    }
    reallocate(capacity) { super.reallocate(capacity); this.items.length = capacity; }
    process(nodeIndex, offset, data) {
      super.process(nodeIndex, offset, data);
      this.items[offset] = data.hidden ? null : { x: data.x, y: data.y, size: data.size, colour: straight(data.color).css };
    }
    render(params) {
      this.ctx.clearRect(0, 0, this.renderer.width, this.renderer.height);   // one node program a layer
      if (this.hasNothingToRender()) return;
      if (this.pickProgram) {
        const down = params.pixelRatio / params.downSizingRatio;
        this.pickProgram.gl.viewport(0, 0, params.width * down, params.height * down);
        this.bindProgram(this.pickProgram);
        this.renderProgram({ ...params, pixelRatio: down }, this.pickProgram);
        this.unbindProgram(this.pickProgram);
      }
      const m = params.matrix, hw = params.width / 2, hh = params.height / 2;
      const ax = m[0] * hw, bx = m[3] * hw, cx = (m[6] + 1) * hw, ay = -m[1] * hh, by = -m[4] * hh, cy = (1 - m[7]) * hh;
      const ctx = this.ctx;
      for (const n of this.items) {                    // in sigma's z order
        if (!n) continue;
        // radius in pixels as sigma's circle program makes it: size / sizeRatio, less its antialiasing
        const r = n.size / params.sizeRatio - 0.5;
        if (r <= 0) continue;
        ctx.fillStyle = n.colour;
        ctx.beginPath();
        ctx.arc(ax * n.x + bx * n.y + cx, ay * n.x + by * n.y + cy, r, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }
  let markFrame = () => {};
  const tooltip = $("tooltip");
  function showTooltip(html, ev) {
    tooltip.innerHTML = html;
    tooltip.style.display = "block";
    const box = $("graph").getBoundingClientRect();
    const x = (ev && ev.x !== undefined ? ev.x : 0), y = (ev && ev.y !== undefined ? ev.y : 0);
    tooltip.style.left = Math.min(x + 14, box.width - 330) + "px";
    tooltip.style.top = Math.max(0, y + 10) + "px";
  }

  function start() {
    buildTabs(); header(); syncControls(); buildLegend();
    view.n = circuits[view.circuit].n_edges;
    $("topn").value = view.n;
    $("slider").value = nToSlider(view.n);
    // The strongest edges enter the graph before sigma first indexes it: the slider then only
    // shows and hides them (a partial refresh) and re-indexes only for weaker ones. A quarter
    // more than the cap: above it the pruned top n reaches that far down the ranks (12.5k on the
    // smollm2 circuit), and a re-index costs a slider frame ~70 ms more.
    const c0 = circuits[view.circuit];
    if (!view.overlay && !SIDE && c0.has_scores) {
      for (let i = 0; i < Math.min(Math.round(1.25 * MAX_DRAWN), c0.edges.s.length); i++) ensureEdge({ ci: view.circuit, i, key: `e${view.circuit}:${i}` }, i);
    }
    redraw();
    $("loading").remove();
    renderer = new Sigma(graph, $("graph"), {
      defaultEdgeType: "line", renderEdgeLabels: false,
      edgeProgramClasses: { line: CanvasLines, rect: CanvasRects },
      nodeProgramClasses: { circle: CanvasCircles }, nodeHoverProgramClasses: { circle: CanvasCircles }, enableEdgeEvents: true, hideEdgesOnMove: true,
      labelDensity: 1, labelGridCellSize: 36, labelRenderedSizeThreshold: 4, labelSize: 11,
      labelColor: { color: "#2d3748" }, zIndex: true, minCameraRatio: 0.05, maxCameraRatio: 4,
      nodeReducer: (key, a) => {
        if (a.kind === "row") return a;
        if (a.kind === "port") {
          if (!view.usedPorts.has(key)) return { ...a, hidden: true };
          if (view.focus && !view.focusPorts.has(key)) return { ...a, color: CONTEXT_COLOUR };
          return a;
        }
        const out = { ...a };
        const size = view.nodeSize.get(key);
        if (size === undefined) { out.color = CONTEXT_COLOUR; out.label = null; out.zIndex = 0; out.size = 2; }
        else {
          out.zIndex = 2; out.size = size;
          // sigma places labels when it indexes the graph: a node that joined the circuit since
          // gets its label forced, rather than a re-index of every edge (~70 ms a slider frame)
          if (!view.indexedNodes.has(key)) out.forceLabel = true;
        }
        if (view.focus && !view.focusNodes.has(key)) { out.color = CONTEXT_COLOUR; out.label = null; }
        if (view.focus === key) { out.highlighted = true; out.forceLabel = true; }
        if (view.matches && view.matches.has(key)) { out.highlighted = true; out.forceLabel = true; out.label = a.label; }
        return out;
      },
      edgeReducer: (key, a) => {
        if (a.link) {
          const port = graph.source(key);
          if (!view.usedPorts.has(port)) return { ...a, hidden: true };
          return view.focus && !view.focusPorts.has(port) ? { ...a, color: FADED } : a;
        }
        if (!view.drawnKeys.has(key)) { a.hidden = true; return a; }     // `a` is sigma's own copy
        if (view.focus) {
          if (view.focusEdges.has(key)) { a.zIndex = 2; a.color = a.strong; }
          else { a.color = FADED; a.zIndex = 0; }
        }
        return a;
      },
    });
    view.indexedNodes = new Set(view.circuitNodes);      // the constructor has indexed the graph
    // Nothing visible is drawn on sigma's WebGL layers (only their offscreen picking passes) nor
    // on its edge-label layer: off the page, Chromium need not read them back and composite them
    // in every frame.
    for (const layer of ["edges", "edgeLabels", "nodes", "hoverNodes"]) renderer.elements[layer].style.display = "none";
    // Timings: from navigation start (first frame) or from the slider's input event (redraw) to
    // the next animation frame after sigma has drawn, when the browser has composited it.
    markFrame = () => requestAnimationFrame(() => {
      const now = performance.now();
      if (view.firstFrameMs === null) view.firstFrameMs = now;
      // `rendered` counts the frames that answer a redraw (not hover or highlight): tests wait on it
      if (view.pendingSince !== null || view.firstFrameMs === now) {
        if (view.pendingSince !== null) { view.lastRedrawMs = now - view.pendingSince; view.pendingSince = null; }
        const st = $("status");
        st.dataset.rendered = String(Number(st.dataset.rendered || 0) + 1);
      }
    });
    renderer.on("afterRender", markFrame);
    markFrame();                              // the constructor has drawn the first frame already
    renderer.on("enterNode", ({ node, event }) => {
      const a = graph.getNodeAttributes(node);
      if (a.kind === "row") return;
      showNode(node, false);
      if (a.kind === "port") { showTooltip(esc(layouts[a.li].receivers[a.receiver].name), event); return; }
      const L = layouts[a.li], n = L.nodes[a.index], c = circuits[SIDE ? a.li : view.circuit];
      showTooltip(`<b>${esc(n.id)}${at(L, a.pos)}</b>${n.role ? " · " + esc(n.role) : ""}${c.node_scores ? `<br>score <span class="tip-score">${fmt(nodeScore(c, L, a.index, a.pos))}</span>` : ""}` +
                  (n.kv_group ? `<br>KV group kv${n.kv_group.group}` : ""), event);
    });
    renderer.on("leaveNode", () => { tooltip.style.display = "none"; if (view.focus) showNode(view.focus, true); });
    renderer.on("enterEdge", ({ edge, event }) => {
      const rows = edgeInfo(edge);
      if (!rows) return;
      $("details").innerHTML = table(rows);
      const a = graph.getEdgeAttributes(edge), c = circuits[a.ci], L = layoutOf(a.ci);
      showTooltip(`${esc(edgeName({ ci: a.ci, i: a.i }).replace("->", "→"))}${a.score !== null && a.score !== undefined ? `<br>score ${fmt(a.score)}` : ""}`, event);
    });
    renderer.on("leaveEdge", () => { tooltip.style.display = "none"; });
    renderer.on("clickNode", ({ node }) => {
      const a = graph.getNodeAttributes(node);
      if (a.kind === "port") { const L = layouts[a.li]; focusOn(nodeKey(a.li, L.nodes[L.receivers[a.receiver].targets[0]].id, a.pos)); return; }
      if (a.kind === "row") return;
      if (view.focus === node) clearFocus(true); else focusOn(node);
    });
    renderer.on("clickStage", () => clearFocus(true));

    let queued = null;
    $("slider").addEventListener("input", (ev) => {
      if (view.inputAt === null) view.inputAt = performance.now();   // the first input not yet answered
      const n = sliderToN(+ev.target.value);
      if (queued !== null) cancelAnimationFrame(queued);    // coalesce fast drags into one redraw per frame
      queued = requestAnimationFrame(() => { queued = null; setTopN(n); });
    });
    $("topn").addEventListener("change", (ev) => setTopN(+ev.target.value || 1));
    $("mode-saved").addEventListener("change", setSaved);
    $("mode-top").addEventListener("change", () => setTopN(view.n));
    $("prune").addEventListener("change", (ev) => { view.prune = ev.target.checked; if (view.mode === "top") redraw(); });
    $("search").addEventListener("input", (ev) => search(ev.target.value, false));
    $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") search(ev.target.value, true); });
    $("search").addEventListener("change", (ev) => search(ev.target.value, true));
  }

  // ---- for scripts and tests -----------------------------------------------------------------
  window.circuitView = {
    data: DATA, view, graph,
    get renderer() { return renderer; },
    counts: () => ({ nodes: view.circuitNodes.size, edges: view.drawn.length, hidden: view.hidden, selected: view.selected }),
    drawnEdgeNames: () => view.drawn.map(edgeName),
    drawnNodes: () => [...view.circuitNodes],
    setTopN, setSaved, focusOn, clearFocus: () => clearFocus(true),
    highlighted: () => view.focus ? { node: view.focus, ancestors: [...view.focusAncestors], descendants: [...view.focusDescendants],
      edges: view.drawn.filter((d) => view.focusEdges.has(d.key)).map(edgeName) } : null,
    overlayFigures: () => (view.overlay ? overlayFigures() : null),
    edgeColours: () => Object.fromEntries(view.drawn.map((d) => [edgeName(d), view.drawnKeys.get(d.key) || renderer.getEdgeDisplayData(d.key).color])),
    nodeViewport: (key) => { const d = renderer.getNodeDisplayData(key); return d ? renderer.framedGraphToViewport(d) : null; },
    timings: () => ({ firstFrameMs: view.firstFrameMs, lastRedrawMs: view.lastRedrawMs }),
  };
  start();
})();

/* cltrace attribution-graph viewer (rendered into one file by viewer/html.py).
 *
 * The page holds thousands of nodes but opens on a view a person can read: the `node_budget`
 * most influential feature and error nodes (a control changes the budget) with every token and
 * logit, the edges among them drawn and each feature's label (else its `LAYER:FEATURE@POS` name)
 * written beside it, error nodes faded. Beyond that view, edges are drawn for the hovered,
 * clicked and pinned nodes, plus (optionally) the strongest edges above a slider threshold, up
 * to a cap: pyvis's default of drawing every edge is what makes large graphs unusable. Nodes
 * keep the positions computed in Python (physics off). Data arrive gzip+base64-encoded in
 * <script> blocks and are decoded with the browser's DecompressionStream, so nothing is fetched.
 * `window.cltrace` exposes the state and a few actions for the tests and the benchmark; the
 * panels of panels.js (pins, supernodes, export, search, top paths, suggested supernodes) use
 * its `core` and fill its `panel`.
 */
(function () {
  "use strict";
  const FEATURE = 0, ERROR = 1, TOKEN = 2, LOGIT = 3;
  const COLOR = { feature: "#f2c14e", featureBorder: "#b8860b", error: "#a0a0a0",
    errorBorder: "#777", token: "#4a7fb0", logit: "#2a9d8f", clicked: "#111", pin: "#d62828",
    match: "#7b2cbf", path: "#ff7f0e",
    // Error nodes are the transcoder's misses, not mechanisms: faded, so features stand out.
    errorFaded: "rgba(170,170,170,0.45)", errorBorderFaded: "rgba(130,130,130,0.5)" };
  const SUPER_COLORS = ["#e76f51", "#2a9d8f", "#8338ec", "#3a86ff", "#fb8500", "#06d6a0"];
  const LIST_LEN = 8;
  const $ = (id) => document.getElementById(id);
  const api = (window.cltrace = window.cltrace || {});
  Object.assign(api, { ready: false, errors: [], lastClickMs: null, clicks: [] });
  api.onInit = api.onInit || [];  // panels.js registers here
  const P = (api.panel = api.panel || {});  // pins, supernodes, search: panels.js
  const S = { clicked: -1, hovered: -1, pinned: [], pinSet: new Set(), supers: [],
    forced: new Set(), matches: [], matchSet: new Set(), matchAt: -1, drawn: new Set(),
    strong: { on: false, frac: 0.06, cap: 300 }, t0: 0, raf: 0, budget: 100, edgesOn: true,
    hl: { nodes: new Set(), edges: new Set() }, labelsDrawn: [] };

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const tokText = (s) => s === "" ? "∅" : String(s).replace(/\n/g, "⏎").replace(/\t/g, "⇥");
  const fmt = (v) => (Math.abs(v) >= 100 || (Math.abs(v) < 0.01 && v !== 0))
    ? v.toExponential(2) : v.toFixed(3);

  function fail(msg) {
    $("graph").innerHTML = '<div class="error-box">' + esc(msg) + "</div>";
    api.errors.push(msg);
    api.ready = true;
  }

  async function decode(id) {
    const b64 = $(id).textContent.trim();
    if (!b64) return null;
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  // --- names --------------------------------------------------------------------------------
  function card(i) {
    return S.C && S.D.kind[i] === FEATURE ? S.C.cards[S.D.layer[i] + "_" + S.D.ref[i]] : null;
  }
  function featureLabel(i) {
    const c = card(i);
    return S.D.label[i] || (c ? c.label : "");
  }
  const tokAt = (i) => JSON.stringify(tokText(S.D.tokens[S.D.pos[i]]));
  // A target may be a custom one (a logit difference, a direction) with no probability.
  const prob = (i) => (S.D.p[i] > 0 ? " p=" + S.D.p[i].toFixed(3) : "");
  // Error nodes' name: "other neurons" in a neuron graph (Graph.error_name), else "error".
  const errName = () => S.D.meta.error_name || "error";
  function name(i) {
    // Features: LAYER:FEATURE@POS, the name `cltrace steer` reads (viewer/names.py).
    const D = S.D, k = D.kind[i];
    if (k === FEATURE) return D.name[i] + " " + (featureLabel(i) || tokAt(i));
    if (k === ERROR) return errName() + " " + D.layer[i] + "@" + D.pos[i] + " " + tokAt(i);
    if (k === TOKEN) return "token @" + D.pos[i] + " " + tokAt(i);
    return "output " + JSON.stringify(S.logitText[i]) + prob(i);
  }
  function shortName(i) {
    // In a path: the token or output string, a feature's canonical name, an error's place.
    const D = S.D, k = D.kind[i];
    if (k === FEATURE) return D.name[i];
    if (k === ERROR) return (errName() === "error" ? "err" : errName()) + " " + D.layer[i] + "@" + D.pos[i];
    if (k === TOKEN) return tokAt(i) + "@" + D.pos[i];
    return JSON.stringify(S.logitText[i]);
  }
  function nodeText(i) {
    // The text written beside a feature on the canvas: its label, else its name.
    const t = featureLabel(i) || S.D.name[i];
    return t.length > 28 ? t.slice(0, 27) + "…" : t;
  }
  function tooltip(i) {
    const D = S.D, k = D.kind[i];
    let t = name(i) + "\n" + D.id[i];
    if (k === FEATURE) t += "\nactivation " + fmt(D.act[i]);
    if (k <= ERROR) t += "\ninfluence " + (100 * D.infl[i]).toFixed(2) + "% (cumulative " +
      D.cum[i].toFixed(3) + ")";
    return t;
  }

  // --- node styles and visibility -----------------------------------------------------------
  function style(i) {
    const D = S.D, k = D.kind[i];
    let bg, border, bw = 1;
    if (k === FEATURE) { bg = COLOR.feature; border = COLOR.featureBorder; }
    else if (k === ERROR) { bg = COLOR.errorFaded; border = COLOR.errorBorderFaded; }
    else { bg = k === TOKEN ? COLOR.token : COLOR.logit; border = "#234"; }
    const sup = P.superOf(i);
    if (sup >= 0) { border = SUPER_COLORS[sup % SUPER_COLORS.length]; bw = 3; }
    else if (S.pinSet.has(i)) { border = COLOR.pin; bw = 3; }
    if (S.hl.nodes.has(i)) { border = COLOR.path; bw = 4; }
    if (S.matchSet.has(i)) { border = COLOR.match; bw = 4; }
    if (i === S.clicked) { border = COLOR.clicked; bw = 4; }
    return { id: i, borderWidth: bw, color: { background: bg, border: border,
      highlight: { background: bg, border: border }, hover: { background: bg, border: border } } };
  }
  function nodeObject(i) {
    const D = S.D, k = D.kind[i];
    const o = style(i);
    o.x = D.x[i]; o.y = D.y[i]; o.hidden = !S.visible[i]; o.title = tooltip(i);
    if (k === FEATURE) { o.shape = "dot"; o.size = 4 + 7 * Math.sqrt(Math.min(1, D.infl[i] / S.maxInfl)); }
    else if (k === ERROR) { o.shape = "diamond"; o.size = 3.5; }
    else { o.shape = "square"; o.size = k === TOKEN ? 6 : 8; }
    return o;
  }
  function restyle(list) {
    const ups = [];
    for (const i of list) if (i >= 0) ups.push(style(i));
    if (ups.length) S.nodes.update(ups);
  }
  function rule(i) {
    if (S.forced.has(i) || S.pinSet.has(i) || i === S.clicked || S.hl.nodes.has(i)) return 1;
    const k = S.D.kind[i];
    if (k >= TOKEN) return 1;
    if (k === ERROR && !S.showErrors) return 0;
    if (!S.inBudget[i]) return 0;
    return S.D.before[i] < S.threshold || S.threshold >= 1 ? 1 : 0;
  }
  function fillBudget() {
    // The budget's nodes: the first `budget` of the feature (and, shown, error) nodes in order
    // of influence (the rank computed in Python, viewer.embed.budget).
    S.inBudget.fill(0);
    let n = 0;
    for (const i of S.order) {
      if (n >= S.budget) break;
      if (S.D.kind[i] === ERROR && !S.showErrors) continue;
      S.inBudget[i] = 1; n++;
    }
  }
  function applyVisibility() {
    fillBudget();
    const changed = [];
    for (let i = 0; i < S.n; i++) {
      const v = rule(i);
      if (v !== S.visible[i]) { S.visible[i] = v; changed.push({ id: i, hidden: !v }); }
    }
    if (changed.length) S.nodes.update(changed);
    refreshEdges();
    counter();
  }

  // --- edges --------------------------------------------------------------------------------
  function refreshEdges() {
    const D = S.D, vis = S.visible, want = new Set();
    if (S.edgesOn) {  // the view's own edges: every held edge between two shown nodes
      for (let e = 0; e < D.es.length; e++) if (vis[D.es[e]] && vis[D.et[e]]) want.add(e);
    }
    for (const e of S.hl.edges) want.add(e);
    const around = (i) => {
      for (const e of S.inE[i]) if (vis[D.es[e]]) want.add(e);
      for (const e of S.outE[i]) if (vis[D.et[e]]) want.add(e);
    };
    if (S.clicked >= 0) around(S.clicked);
    if (S.hovered >= 0) around(S.hovered);
    for (const i of S.pinned) for (const e of S.inE[i]) if (S.pinSet.has(D.es[e])) want.add(e);
    let strong = 0;
    if (S.strong.on) {
      const thr = S.strong.frac * S.maxAbs;
      // Edges are stored strongest first, so the scan stops at the threshold or the cap.
      for (let e = 0; e < D.ew.length && strong < S.strong.cap; e++) {
        if (Math.abs(D.ew[e]) < thr) break;
        if (vis[D.es[e]] && vis[D.et[e]] && !want.has(e)) { want.add(e); strong++; }
      }
    }
    S.nStrong = strong;
    const hlKey = [...S.hl.edges].join(",");
    if (hlKey === S.drawnHl && want.size === S.drawn.size && [...want].every((e) => S.drawn.has(e))) {
      edgeCounter(); return;
    }
    S.drawnHl = hlKey;
    // Width and colour strength by edge score (the edge's share of its target's input times
    // the target's influence, as pruning ranks edges): what matters for the output stands out
    // among the hundreds the first view draws, and an edge into a minor node fades.
    let max = 0;
    for (const e of want) max = Math.max(max, D.sc[e]);
    const objs = [];
    for (const e of want) {
      const r = max > 0 ? D.sc[e] / max : 0, a = (0.08 + 0.87 * Math.sqrt(r)).toFixed(2);
      const hl = S.hl.edges.has(e);
      const c = hl ? COLOR.path : D.ew[e] >= 0 ? "rgba(33,102,172," + a + ")" : "rgba(203,24,29," + a + ")";
      objs.push({ id: e, from: D.es[e], to: D.et[e], width: hl ? 5 : 0.5 + 4 * r,
        color: { color: c, highlight: c, hover: c, inherit: false } });
    }
    S.edges.clear();
    S.edges.add(objs);
    S.drawn = want;
    edgeCounter();
  }
  function scheduleEdges() {
    if (S.raf) return;
    S.raf = requestAnimationFrame(() => { S.raf = 0; refreshEdges(); });
  }

  // --- counters and report ------------------------------------------------------------------
  function counter() {
    const D = S.D;
    let shown = 0, bySlider = 0, byErrors = 0;
    for (let i = 0; i < S.n; i++) {
      if (S.visible[i]) { shown++; continue; }
      if (D.kind[i] === ERROR && !S.showErrors) byErrors++; else bySlider++;
    }
    const rep = D.meta.report;
    $("counter").textContent = "Showing " + shown + " of " + S.n + " nodes in this file · hidden: " +
      (S.n - shown) + " (" + bySlider + " by the node budget or pruning, " + byErrors + " errors off) · not in this file: " +
      rep.nodes_left_out + " nodes, " + rep.edges_left_out + " edges";
    $("counter").dataset.shown = shown;
    $("counter").dataset.hidden = S.n - shown;
  }
  function edgeCounter() {
    $("edge-counter").textContent = S.drawn.size + " edges drawn" +
      (S.strong.on ? " (" + S.nStrong + " strongest)" : "") + " of " + S.D.es.length + " held";
  }
  function report() {
    const r = S.D.meta.report, c = S.D.meta.config;
    const f = r.full_graph;
    $("report-body").textContent =
      (f ? "Full graph: " + f.nodes + " nodes (" + f.features + " features), " + f.edges +
        " edges; the trace stored its " + (f.features - f.features_left_out) +
        " most influential features (streamed).\n" : "") +
      "Nodes: " + r.nodes_held + " of " + r.nodes_in_graph + " held (" + r.features_held + " of " +
      r.features_in_graph + " features, " + r.errors_held + " of " + r.errors_in_graph + " errors).\n" +
      "  left out: " + r.left_out_below_influence + " beyond max_influence=" + c.max_influence +
      " (or with no influence), " + r.left_out_over_node_cap + " over max_nodes=" + c.max_nodes +
      (r.left_out_errors_off ? ", " + r.left_out_errors_off + " errors (errors off)" : "") + ".\n" +
      "Edges: " + r.edges_held + " of " + r.edges_in_graph + " held.\n  left out: " +
      r.left_out_edges_of_left_out_nodes + " touching nodes left out, " +
      r.left_out_edge_per_node_cap + " over max_edges_per_node=" + c.max_edges_per_node + ", " +
      r.left_out_edge_total_cap + " over max_edges=" + c.max_edges + ".\n" +
      "Re-run `cltrace view` with larger caps to hold more." +
      (r.cards_note ? "\nFeature cards: " + r.cards_note + "." : "");
  }

  // --- selection and the side panel ---------------------------------------------------------
  function select(i) {
    const prev = S.clicked;
    S.clicked = i;
    if (i >= 0 && !S.visible[i]) S.forced.add(i);
    restyle([prev, i]);
    if (i >= 0 && !S.visible[i]) applyVisibility(); else refreshEdges();
    renderNode();
    S.net.redraw();
  }
  function linkList(i, edges, other) {
    const D = S.D, pos = [], neg = [];
    for (const e of edges) {
      const list = D.ew[e] >= 0 ? pos : neg;
      if (list.length < LIST_LEN) list.push(e);  // edges are stored strongest first
    }
    const rows = (list) => list.length ? list.map((e) => {
      const j = other[e];
      return '<div class="link' + (S.visible[j] ? "" : " hidden-node") + '" data-node="' + j +
        '" title="' + esc(D.id[j]) + (S.visible[j] ? "" : " (hidden: click to reveal)") + '">' +
        '<span class="name">' + esc(name(j)) + '</span><span class="w">' + fmt(D.ew[e]) +
        "</span></div>";
    }).join("") : '<div class="muted">none</div>';
    return '<div class="cols"><div><h4 class="pos">positive</h4>' + rows(pos) +
      '</div><div><h4 class="neg">negative</h4>' + rows(neg) + "</div></div>";
  }
  function examples(list, vocab) {
    return list.map((ex) => {
      const [act, toks, acts, at] = ex;
      return '<div class="ex"><span class="a">' + fmt(act) + "</span>" + toks.map((t, k) =>
        '<span class="t' + (k === at ? " max" : "") + '" style="background:rgba(255,140,0,' +
        (acts[k] / 255).toFixed(2) + ')">' + esc(tokText(vocab[t] ?? "<" + t + ">")) + "</span>")
        .join("") + "</div>";
    }).join("") || '<div class="muted">none</div>';
  }
  function cardHtml(i) {
    const D = S.D;
    if (D.kind[i] !== FEATURE) return "";
    const c = card(i);
    if (!c) {
      return '<h3>Feature card</h3><p class="muted">No card for this feature: build cards with ' +
        "<code>cltrace features --transcoder PATH --model NAME --data PATH</code> and re-run " +
        "<code>cltrace view</code>.</p>" + (D.label[i] ? '<div class="label">' + esc(D.label[i]) + "</div>" : "");
    }
    const v = S.C.vocab, chips = (list) => list.map(([t, val]) => '<span title="' + fmt(val) +
      '">' + esc(tokText(v[t] ?? "<" + t + ">")) + "</span>").join("");
    const rel = c.max > 0 ? " (" + (100 * D.act[i] / c.max).toFixed(0) + "% of its max " + fmt(c.max) + ")" : "";
    return '<h3>Feature card</h3><div class="label" id="card-label">' + esc(featureLabel(i)) + "</div>" +
      '<p class="facts">layer ' + D.layer[i] + " · feature " + D.ref[i] + " · activation here " +
      fmt(D.act[i]) + rel + " · density " + (100 * c.d).toPrecision(2) + "%</p>" +
      (c.self ? '<p class="facts" id="card-self" title="What the model said with this feature\'s ' +
        'direction patched in (cltrace features --explain)">the model says: &ldquo;' +
        esc(c.self) + "&rdquo;</p>" : "") +
      "<h3>Top output tokens</h3><div class=\"chips pos\">+ " + chips(c.pos) +
      '</div><div class="chips neg">&minus; ' + chips(c.neg) + "</div>" +
      '<h3>Top activating examples</h3><div id="card-top">' + examples(c.top, v) + "</div>" +
      "<h3>Samples across its range</h3>" + examples(c.smp, v);
  }
  function renderNode() {
    const i = S.clicked, D = S.D, box = $("node-info");
    if (i < 0) {
      box.innerHTML = '<p class="muted">Click a node to see its strongest inputs and outputs and, ' +
        "for a feature, its card. Hover shows a node's edges; shift-click or <kbd>p</kbd> pins.</p>";
      return;
    }
    const k = D.kind[i];
    const facts = [["feature", errName() + " node", "token", "logit"][k], D.id[i]];
    if (k <= ERROR) facts.push("layer " + D.layer[i], "influence " + (100 * D.infl[i]).toFixed(2) +
      "%", "cumulative " + D.cum[i].toFixed(3));
    if (k === FEATURE) facts.push("activation " + fmt(D.act[i]));
    box.innerHTML = "<h2>" + esc(name(i)) + '</h2><p class="facts">' + facts.map(esc).join(" · ") +
      '</p><button type="button" id="pin-btn">' + (S.pinSet.has(i) ? "unpin" : "pin") + "</button>" +
      cardHtml(i) +  // what a feature means first, then how it connects
      (k !== TOKEN ? "<h3>Strongest inputs</h3>" + linkList(i, S.inE[i], D.es) : "") +
      (k !== LOGIT ? "<h3>Strongest outputs</h3>" + linkList(i, S.outE[i], D.et) : "");
    $("pin-btn").onclick = () => P.togglePin(i);
  }
  function focusIfOffscreen(i) {
    const p = S.net.getPositions([i])[i], d = S.net.canvasToDOM(p), g = $("graph");
    if (d.x < 0 || d.y < 0 || d.x > g.clientWidth || d.y > g.clientHeight) {
      S.net.moveTo({ position: p, animation: false });
    }
  }

  // --- drawing: axes, labels, supernodes ----------------------------------------------------
  function drawAxes(ctx) {
    const A = S.D.axis, D = S.D, sc = S.net.getScale(), px = 1 / sc, nr = A.y.length;
    const left = A.x[0] - A.w[0] / 2, top = A.y[nr - 1] - 30, bottom = A.y[0] + 12;
    const g = $("graph"), v0 = S.net.DOMtoCanvas({ x: 0, y: 0 }),
      v1 = S.net.DOMtoCanvas({ x: g.clientWidth, y: g.clientHeight });
    ctx.save();
    ctx.lineWidth = px;
    ctx.strokeStyle = "#eceef3";
    for (let r = 1; r < nr - 1; r++) {  // light band lines between layers
      ctx.beginPath(); ctx.moveTo(left, A.y[r]); ctx.lineTo(A.x[A.x.length - 1] + A.w[A.w.length - 1] / 2, A.y[r]); ctx.stroke();
    }
    ctx.fillStyle = "#777";
    ctx.font = 11 * px + "px system-ui, sans-serif";
    ctx.textAlign = "right";
    const lx = Math.max(Math.min(left, S.minX) - 12 * px, v0.x + 44 * px);
    for (let r = 0; r < nr; r++) {
      ctx.fillText(r === 0 ? "tokens" : r === nr - 1 ? "logits" : "L" + (r - 1), lx, A.y[r] + 4 * px);
    }
    // Token strings along the bottom, tilted; skipped where columns are too narrow on screen.
    const step = Math.max(1, Math.ceil(9 / Math.max(1e-6, Math.min(...A.w.slice(0, 64)) * sc)));
    ctx.font = 11 * px + "px ui-monospace, 'DejaVu Sans Mono', monospace";
    ctx.fillStyle = "#333";
    for (let p = 0; p < A.x.length; p++) {
      if (A.x[p] < v0.x - 200 * px || A.x[p] > v1.x + 20 * px) continue;
      if (A.w[p] * sc < 9 && p % step) continue;
      let t = tokText(D.tokens[p]);
      if (t.length > 16) t = t.slice(0, 15) + "…";
      ctx.save();
      ctx.translate(A.x[p] + 3 * px, bottom + 8 * px);
      ctx.rotate(-0.7);
      ctx.fillText(t, 0, 0);
      ctx.restore();
    }
    ctx.restore();
  }
  function halo(ctx, text, x, y, px, align) {
    ctx.textAlign = align || "center";
    ctx.lineWidth = 3 * px;
    ctx.strokeStyle = "rgba(255,255,255,0.9)";
    ctx.strokeText(text, x, y);
    ctx.fillText(text, x, y);
  }
  function drawLabels(ctx, px) {
    // Node text at a constant size on screen: the clicked and pinned nodes' full names first,
    // then every shown feature's label (else its name), most influential first, skipping a
    // label that would overlap one already written (zooming in makes room for more).
    const D = S.D, boxes = [], drawn = [];
    const g = $("graph"), v0 = S.net.DOMtoCanvas({ x: 0, y: 0 }),
      v1 = S.net.DOMtoCanvas({ x: g.clientWidth, y: g.clientHeight });
    const put = (i, t, force) => {
      const w = ctx.measureText(t).width, x = D.x[i] + 8 * px, y = D.y[i] - 4 * px;
      const b = [x, y - 11 * px, x + w, y + 2 * px];
      if (b[2] < v0.x || b[0] > v1.x || b[3] < v0.y || b[1] > v1.y) return;
      const gap = 12 * px;  // labels never touch: one reads as one
      if (!force && boxes.some((o) => b[0] < o[2] + gap && o[0] < b[2] + gap && b[1] < o[3] && o[1] < b[3])) return;
      boxes.push(b);
      halo(ctx, t, x, y, px, "left");
      drawn.push([i, t]);
    };
    ctx.font = "600 " + 11 * px + "px system-ui, sans-serif";
    ctx.fillStyle = "#222";
    const named = S.pinned.slice();
    if (S.clicked >= 0) named.push(S.clicked);
    const done = new Set();
    for (const i of named.reverse()) {  // the clicked node first, always written
      if (!S.visible[i] || D.kind[i] >= TOKEN || done.has(i)) continue;
      done.add(i);
      let t = name(i);
      if (t.length > 40) t = t.slice(0, 39) + "…";
      put(i, t, i === S.clicked);
    }
    ctx.font = 10 * px + "px system-ui, sans-serif";
    ctx.fillStyle = "#4a3b00";
    for (const i of S.order) {
      if (S.visible[i] && D.kind[i] === FEATURE && !done.has(i)) put(i, nodeText(i), false);
    }
    S.labelsDrawn = drawn;
  }
  function afterDraw(ctx) {
    const D = S.D, sc = S.net.getScale(), px = 1 / sc;
    ctx.save();
    ctx.font = "600 " + 12 * px + "px system-ui, sans-serif";
    ctx.fillStyle = "#1b4d46";
    // Logits: the token over its probability, every other one raised so neighbours never
    // clash; zoomed far out, only every k-th (the most probable first) is labelled.
    const every = Math.max(1, Math.ceil(44 / (Math.abs(D.x[S.firstLogit] - D.x[S.firstLogit + 1]) * sc || 1e9)));
    for (let i = S.firstLogit, j = 0; i >= 0 && i < S.n && D.kind[i] === LOGIT; i++, j++) {
      if (j % every) continue;
      let t = tokText(S.logitText[i]);
      if (t.length > 12) t = t.slice(0, 11) + "…";
      const lift = ((j / every) % 2) * 26 * px;
      ctx.font = "600 " + 12 * px + "px system-ui, sans-serif";
      halo(ctx, JSON.stringify(t), D.x[i], D.y[i] - 26 * px - lift, px);
      ctx.font = 11 * px + "px system-ui, sans-serif";
      if (D.p[i] > 0) halo(ctx, (100 * D.p[i]).toFixed(1) + "%", D.x[i], D.y[i] - 13 * px - lift, px);
    }
    drawLabels(ctx, px);
    S.supers.forEach((s, k) => {
      const xs = s.members.map((i) => D.x[i]), ys = s.members.map((i) => D.y[i]);
      const x0 = Math.min(...xs) - 14, x1 = Math.max(...xs) + 14, y0 = Math.min(...ys) - 14,
        y1 = Math.max(...ys) + 14;
      ctx.strokeStyle = SUPER_COLORS[k % SUPER_COLORS.length];
      ctx.lineWidth = 2 * px;
      ctx.setLineDash([6 * px, 4 * px]);
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.setLineDash([]);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.font = "600 " + 12 * px + "px system-ui, sans-serif";
      halo(ctx, s.name, x0, y0 - 4 * px, px, "left");
    });
    ctx.restore();
    void $("panel").offsetHeight;  // include the panel's layout in the measured click time
    if (S.t0) { api.lastClickMs = performance.now() - S.t0; api.clicks.push(api.lastClickMs); S.t0 = 0; }
    if (!api.ready) { api.ready = true; api.loadMs = performance.now(); }
  }

  function fitAll(whole) {
    // vis-network's fit() frames the nodes only; ours keeps screen margins for the axis labels
    // (layer names left, logit labels on top, tilted token strings below). A long prompt's
    // graph is far wider than tall: unless `whole`, fit its height and show its right end (the
    // last positions and the logits); the fit button shows the whole.
    const D = S.D, g = $("graph"), W = g.clientWidth, H = g.clientHeight;
    const pad = { l: 64, r: 24, t: 84, b: 84 };
    const x0 = Math.min(...D.x), x1 = Math.max(...D.x), y0 = Math.min(...D.y), y1 = Math.max(...D.y);
    const sx = (W - pad.l - pad.r) / Math.max(x1 - x0, 1), sy = (H - pad.t - pad.b) / Math.max(y1 - y0, 1);
    const scale = Math.min(whole || sx >= sy / 3 ? Math.min(sx, sy) : sy, 1.25);
    // The view's centre: the content centred in the padded box or, when it is wider than the
    // view, with its right end at the right margin.
    const cx = scale > sx ? x1 - (W / 2 - pad.r) / scale : (x0 + x1) / 2 - (pad.l - pad.r) / 2 / scale;
    const cy = (y0 + y1) / 2 - (pad.t - pad.b) / 2 / scale;
    S.net.moveTo({ position: { x: cx, y: cy }, scale: scale, animation: false });
  }

  // --- controls -----------------------------------------------------------------------------
  function wire() {
    const bud = $("budget");
    bud.max = String(S.order.length);
    bud.value = String(S.budget);
    bud.addEventListener("input", () => {
      const v = Math.round(+bud.value);
      if (!(v >= 1)) return;  // an empty or partial entry: wait for a number
      S.budget = v;
      applyVisibility();
    });
    $("edges-on").checked = S.edgesOn;
    $("edges-on").addEventListener("change", (e) => { S.edgesOn = e.target.checked; refreshEdges(); });
    const thr = $("threshold");
    thr.max = String(S.D.meta.config.max_influence);
    thr.value = String(S.threshold);
    const showThr = () => { $("threshold-value").textContent = (+thr.value).toFixed(2); };
    showThr();
    let pending = 0;
    thr.addEventListener("input", () => {
      showThr();
      if (pending) return;
      pending = requestAnimationFrame(() => { pending = 0; S.threshold = +thr.value; applyVisibility(); });
    });
    $("show-errors").addEventListener("change", (e) => { S.showErrors = e.target.checked; applyVisibility(); });
    const sOn = $("strong-on"), sThr = $("strong-thr"), sCap = $("strong-cap");
    sOn.checked = S.strong.on;
    sCap.value = String(S.strong.cap);
    const strong = () => {
      // Log scale: the slider spans 0.1% .. 100% of the strongest |weight|.
      S.strong.frac = Math.pow(10, -3 + 3 * (+sThr.value) / 100);
      S.strong.on = sOn.checked;
      S.strong.cap = Math.max(1, +sCap.value || 1);
      $("strong-value").textContent = S.strong.frac.toPrecision(2);
      scheduleEdges();
    };
    [sOn, sThr, sCap].forEach((el) => el.addEventListener("input", strong));
    sOn.addEventListener("change", strong);
    strong();
    let timer = 0;
    const box = $("search");
    box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => P.search(box.value), 150); });
    box.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { clearTimeout(timer); if (!S.matches.length) P.search(box.value); P.nextMatch(); }
    });
    $("fit").addEventListener("click", () => fitAll(true));
    $("panel").addEventListener("click", (e) => {
      const un = e.target.closest("[data-unpin]"), ug = e.target.closest("[data-ungroup]");
      if (un) { P.togglePin(+un.dataset.unpin); return; }
      if (ug) { S.supers.splice(+ug.dataset.ungroup, 1); restyle(S.pinned); P.renderSubgraph(); S.net.redraw(); return; }
      const el = e.target.closest("[data-node]");
      if (el) { S.t0 = e.timeStamp; const j = +el.dataset.node; select(j); focusIfOffscreen(j); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA") return;
      if (e.key === "p" && S.clicked >= 0) P.togglePin(S.clicked);
      if (e.key === "Escape") select(-1);
    });
  }

  function init(D, C) {
    S.D = D; S.C = C; S.n = D.kind.length;
    S.logitText = new Array(S.n);
    S.firstLogit = -1;
    S.maxInfl = 1e-12;
    S.minX = Math.min(...D.x);
    for (let i = 0, j = 0; i < S.n; i++) {
      if (D.kind[i] === LOGIT) { if (S.firstLogit < 0) S.firstLogit = i; S.logitText[i] = D.meta.logit_strings[j++]; }
      if (D.kind[i] === FEATURE) S.maxInfl = Math.max(S.maxInfl, D.infl[i]);
    }
    S.inE = Array.from({ length: S.n }, () => []);
    S.outE = Array.from({ length: S.n }, () => []);
    for (let e = 0; e < D.es.length; e++) { S.inE[D.et[e]].push(e); S.outE[D.es[e]].push(e); }
    S.maxAbs = D.ew.length ? Math.abs(D.ew[0]) : 1;
    S.threshold = Math.min(D.meta.node_threshold, D.meta.config.max_influence);
    S.showErrors = true;
    S.strong.on = D.meta.config.strongest_edges > 0;
    S.strong.cap = D.meta.config.strongest_edges || 300;
    // Feature and error nodes by influence (rank from Python), for the node budget.
    S.order = [];
    for (let i = 0; i < S.n; i++) if (D.rank[i] >= 0) S.order[D.rank[i]] = i;
    S.budget = D.meta.config.node_budget || 100;
    S.edgesOn = D.meta.config.view_edges !== false;
    S.inBudget = new Uint8Array(S.n);
    fillBudget();
    S.visible = new Uint8Array(S.n);
    for (let i = 0; i < S.n; i++) S.visible[i] = rule(i);
    const nodes = new Array(S.n);
    for (let i = 0; i < S.n; i++) nodes[i] = nodeObject(i);
    S.nodes = new vis.DataSet(nodes);
    S.edges = new vis.DataSet([]);
    $("loading").remove();
    S.net = new vis.Network($("graph"), { nodes: S.nodes, edges: S.edges },
      JSON.parse($("vis-options").textContent));
    S.net.on("beforeDrawing", drawAxes);
    S.net.on("afterDrawing", afterDraw);
    S.net.on("click", (p) => {
      const src = p.event && p.event.srcEvent;
      S.t0 = src && src.timeStamp ? src.timeStamp : performance.now();
      const i = p.nodes.length ? p.nodes[0] : -1;
      if (i >= 0 && src && src.shiftKey) P.togglePin(i);
      select(i);
    });
    S.net.on("hoverNode", (p) => { S.hovered = p.node; scheduleEdges(); });
    S.net.on("blurNode", () => { S.hovered = -1; scheduleEdges(); });
    // vis-network keeps a node hovered when the pointer leaves the canvas over it.
    $("graph").addEventListener("mouseleave", () => { if (S.hovered >= 0) { S.hovered = -1; scheduleEdges(); } });
    wire();
    for (const f of api.onInit) f();
    counter();
    report();
    refreshEdges();
    fitAll(false);
  }

  Object.assign(api, {
    // What panels.js builds on.
    core: { $: $, esc: esc, fmt: fmt, name: name, shortName: shortName, featureLabel: featureLabel,
      select: select, restyle: restyle, applyVisibility: applyVisibility, refreshEdges: refreshEdges,
      renderNode: renderNode, focusIfOffscreen: focusIfOffscreen, SUPER_COLORS: SUPER_COLORS },
    setBudget: (b) => { S.budget = b; $("budget").value = String(b); applyVisibility(); },
    select: (i) => select(i), fit: (whole) => fitAll(whole), state: S,
    nodeIndex: (id) => S.D.id.indexOf(id),
    visibleCount: () => S.visible.reduce((a, b) => a + b, 0),
    drawnEdges: () => [...S.drawn],
    domPosition: (i) => S.net.canvasToDOM(S.net.getPositions([i])[i]),
    setThreshold: (t) => {
      S.threshold = t;
      $("threshold").value = String(t);
      $("threshold-value").textContent = t.toFixed(2);
      applyVisibility();
    },
  });

  async function main() {
    if (typeof DecompressionStream === "undefined") {
      fail("This browser cannot read the embedded graph: it needs DecompressionStream " +
        "(Chrome 80+, Firefox 113+, Safari 16.4+).");
      return;
    }
    try {
      const [D, C] = await Promise.all([decode("graph-data"), decode("cards-data")]);
      init(D, C);
    } catch (err) {
      fail("Could not open the graph: " + (err && err.message ? err.message : err));
      throw err;
    }
  }
  main();
})();

/* cltrace viewer panels, built on viewer.js's `window.cltrace.core` (viewer/html.py inlines
 * this file right after viewer.js): pins, supernodes, the Neuronpedia export and the `cltrace
 * steer` command of the pinned features; search; the top paths to each target and the suggested
 * supernodes, both computed in Python (viewer/paths.py, viewer/supernodes.py) and embedded in
 * the page data (rendered once the graph is decoded, `onInit`).
 *
 * Clicking a path highlights its nodes and edges (its nodes show even when outside the node
 * budget, as a clicked node does); clicking it again clears it. A suggestion is accepted (its
 * features are pinned and grouped into an ordinary supernode, under the name in its box),
 * renamed (edit the box, before or after accepting), or dissolved (dropped).
 */
(function () {
  "use strict";
  const FEATURE = 0, TOKEN = 2, LOGIT = 3;
  const api = window.cltrace, c = api.core, S = api.state;
  const { $, esc, fmt, name, shortName, featureLabel, select, restyle, applyVisibility,
    refreshEdges, renderNode, focusIfOffscreen, SUPER_COLORS } = c;
  const P = { active: null, sugg: [] };

  // --- pins, supernodes, export -------------------------------------------------------------
  function superOf(i) {
    for (let s = 0; s < S.supers.length; s++) if (S.supers[s].members.includes(i)) return s;
    return -1;
  }
  function togglePin(i) {
    if (S.pinSet.has(i)) {
      S.pinSet.delete(i);
      S.pinned = S.pinned.filter((j) => j !== i);
      S.supers.forEach((s) => { s.members = s.members.filter((j) => j !== i); });
      S.supers = S.supers.filter((s) => s.members.length > 0);
    } else { S.pinSet.add(i); S.pinned.push(i); }
    restyle([i]);
    refreshEdges();
    renderSubgraph();
    if (S.clicked === i) renderNode();
    S.net.redraw();
  }
  function group(label, members) {
    const ms = members.filter((i) => S.pinSet.has(i));
    if (!ms.length) return;
    S.supers.forEach((s) => { s.members = s.members.filter((j) => !ms.includes(j)); });
    S.supers = S.supers.filter((s) => s.members.length > 0);
    S.supers.push({ name: label || "group " + (S.supers.length + 1), members: ms });
    restyle(S.pinned);
    renderSubgraph();
    S.net.redraw();
  }
  function renderSubgraph() {
    const box = $("subgraph");
    if (!S.pinned.length) { box.innerHTML = ""; return; }
    box.innerHTML = "<h3>Pinned subgraph (" + S.pinned.length + ")</h3>" + S.pinned.map((i) =>
      '<div class="pinned-row"><input type="checkbox" data-pin="' + i + '"><span class="name" data-node="' +
      i + '">' + esc(name(i)) + '</span><button type="button" data-unpin="' + i + '">×</button></div>').join("") +
      '<p><input type="text" id="super-name" placeholder="supernode name"> ' +
      '<button type="button" id="group-btn">group checked</button></p>' +
      S.supers.map((s, k) => '<div class="super" style="border-color:' + SUPER_COLORS[k % SUPER_COLORS.length] +
        '"><input type="text" class="rename" data-rename="' + k + '" value="' + esc(s.name) +
        '" title="rename">: ' + s.members.map((i) => esc(name(i))).join("; ") +
        ' <button type="button" data-ungroup="' + k + '">ungroup</button></div>').join("") +
      '<p><button type="button" id="export-btn">export JSON (Neuronpedia)</button> ' +
      '<button type="button" id="clear-btn">clear pins</button></p>' +
      '<p><button type="button" id="steer-btn" title="The cltrace steer command that zeroes the ' +
      'pinned features">copy intervention</button> <span id="steer-note" class="muted"></span></p>' +
      '<textarea id="steer-cmd" readonly rows="3" spellcheck="false">' + esc(steerCommand()) + "</textarea>";
    $("group-btn").onclick = () => group($("super-name").value.trim(),
      [...box.querySelectorAll("input[data-pin]:checked")].map((el) => +el.dataset.pin));
    $("export-btn").onclick = download;
    $("clear-btn").onclick = () => { [...S.pinned].forEach(togglePin); };
    $("steer-btn").onclick = copySteer;
    box.querySelectorAll("input[data-rename]").forEach((el) => el.addEventListener("input", () => {
      S.supers[+el.dataset.rename].name = el.value; S.net.redraw();
    }));
  }
  function steerCommand() {
    // viewer/names.py's steer_command: the head (prompt, model, transcoder, shell-quoted in
    // Python), one --zero per pinned feature by its canonical name, then the tail (a prompt
    // that starts with '-' goes last, after --).
    const D = S.D, st = D.meta.steer || { head: "", tail: "" };
    const feats = S.pinned.filter((i) => D.kind[i] === FEATURE);
    if (!feats.length) return "";
    return [st.head].concat(feats.map((i) => "--zero " + D.name[i]), st.tail ? [st.tail] : []).join(" ");
  }
  async function copySteer() {
    const text = steerCommand(), box = $("steer-cmd"), note = $("steer-note");
    api.copied = text;
    if (!text) { note.textContent = "pin features first"; return; }
    try {
      await navigator.clipboard.writeText(text);
      note.textContent = "copied";
    } catch (err) {  // no clipboard permission (e.g. some file:// pages): select it instead
      box.focus(); box.select();
      let ok = false;
      try { ok = document.execCommand("copy"); } catch (err2) { ok = false; }
      note.textContent = ok ? "copied" : "selected: press Ctrl+C";
    }
  }
  function npNode(i) {
    // The record attribution.export.node_record wrote for this node; a feature's clerp is its
    // label on this page.
    const n = Object.assign({}, S.D.np[i]);
    if (S.D.kind[i] === FEATURE) n.clerp = featureLabel(i);
    return n;
  }
  function exportSubgraph() {
    const D = S.D, links = [];
    for (const i of S.pinned) for (const e of S.inE[i]) {
      if (S.pinSet.has(D.es[e])) links.push({ source: D.id[D.es[e]], target: D.id[i], weight: D.ew[e] });
    }
    const meta = Object.assign({}, D.meta.neuronpedia, { node_threshold: S.threshold });
    return { metadata: meta, qParams: { pinnedIds: S.pinned.map((i) => D.id[i]),
      supernodes: S.supers.map((s) => [s.name].concat(s.members.map((i) => D.id[i]))),
      linkType: "both", clickedId: S.clicked >= 0 ? D.id[S.clicked] : "", sg_pos: "" },
      nodes: S.pinned.map(npNode), links: links };
  }
  function download() {
    const blob = new Blob([JSON.stringify(exportSubgraph(), null, 1)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "subgraph.json";
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  // --- search -------------------------------------------------------------------------------
  function search(q) {
    const D = S.D, old = [...S.matchSet];
    S.matchSet = new Set();
    S.matches = [];
    S.matchAt = -1;
    q = q.trim().toLowerCase();
    if (q) {
      // LAYER:FEATURE@POS (the canonical name; without @POS: every position), or the older
      // forms L3 F120, L3 #120, 3_120 (a Neuronpedia id's start), #120.
      const cn = q.match(/^(\d+)\s*:\s*(\d+)\s*(?:@\s*(\d+))?$/);
      const lf = cn || q.match(/^l\s*(\d+)\s*[\s_/:.,-]*\s*(?:f|#)\s*(\d+)$/) || q.match(/^(\d+)_(\d+)$/);
      const fo = q.match(/^(?:f|#)\s*(\d+)$/);
      for (let i = 0; i < S.n; i++) {
        const k = D.kind[i];
        let hit = D.id[i].toLowerCase() === q;
        if (!hit && k === FEATURE) {
          if (lf) hit = D.layer[i] === +lf[1] && D.ref[i] === +lf[2] && (!cn || cn[3] === undefined || D.pos[i] === +cn[3]);
          else if (fo) hit = D.ref[i] === +fo[1];
          else hit = featureLabel(i).toLowerCase().includes(q);
        } else if (!hit && !lf && !fo && k === TOKEN) {
          hit = D.tokens[D.pos[i]].toLowerCase().includes(q);
        } else if (!hit && !lf && !fo && k === LOGIT) {
          hit = S.logitText[i].toLowerCase().includes(q);
        }
        if (hit) { S.matchSet.add(i); S.matches.push(i); }
      }
    }
    restyle(old.concat(S.matches));
    const hidden = S.matches.filter((i) => !S.visible[i]).length;
    $("search-info").textContent = q ? S.matches.length + " match" +
      (S.matches.length === 1 ? "" : "es") + (hidden ? " (" + hidden + " hidden)" : "") +
      (S.matches.length ? " · Enter: next" : "") : "";
  }
  function nextMatch() {
    if (!S.matches.length) return;
    S.matchAt = (S.matchAt + 1) % S.matches.length;
    const i = S.matches[S.matchAt];
    select(i);
    focusIfOffscreen(i);
  }

  // --- top paths ----------------------------------------------------------------------------
  function pathRows(t, a) {
    if (!t.paths.length) return '<div class="muted">no path from the tokens among the held edges</div>';
    return t.paths.map((p, b) => {
      const [score, nodes] = p;
      return '<div class="path" data-path="' + a + "," + b + '" title="' +
        esc(nodes.map(name).join(" → ")) + '"><span class="name">' +
        nodes.map((i) => esc(shortName(i))).join(" → ") + '</span><span class="w">' +
        fmt(score) + "</span></div>";
    }).join("");
  }
  function renderPaths() {
    const D = S.D, box = $("paths");
    if (!D.paths || !D.paths.length || !D.paths.some((t) => t.paths.length)) { box.innerHTML = ""; return; }
    box.innerHTML = '<details open><summary>Top paths to each target</summary>' +
      '<p class="muted">From the input tokens, ranked by the product of each edge\'s share of ' +
      "its target's input. Click a path to highlight it.</p>" +
      D.paths.map((t, a) => "<h4>→ " + esc(name(t.target)) + "</h4>" + pathRows(t, a)).join("") +
      "</details>";
  }
  function highlightPath(a, b) {
    // Toggle the highlight of path b of target a (a < 0: clear).
    const D = S.D, key = a + "," + b;
    const old = [...S.hl.nodes];
    S.hl.nodes = new Set();
    S.hl.edges = new Set();
    P.active = a < 0 || P.active === key ? null : key;
    if (P.active) {
      const p = D.paths[a].paths[b];
      p[1].forEach((i) => S.hl.nodes.add(i));
      p[2].forEach((e) => S.hl.edges.add(e));
    }
    restyle(old.concat([...S.hl.nodes]));
    applyVisibility();  // shows the path's nodes, draws its edges
    document.querySelectorAll("#paths .path").forEach((el) =>
      el.classList.toggle("active", el.dataset.path === P.active));
    S.net.redraw();
    return P.active;
  }

  // --- suggested supernodes ----------------------------------------------------------------
  function renderSuggestions() {
    const box = $("suggest");
    if (!P.sugg.length) { box.innerHTML = ""; return; }
    const open = P.sugg.filter((g) => g.state === "open").length;
    const was = box.querySelector("details");
    box.innerHTML = "<details" + (was && !was.open ? "" : " open") + "><summary>Suggested supernodes (" +
      open + ")</summary>" + '<p class="muted">Features at one position that act alike (similar ' +
      "out-edges, or the same top output token). Accept to group them (they are pinned), rename, " +
      "or dissolve.</p>" + P.sugg.map((g, k) => g.state !== "open" ? "" :
      '<div class="sugg" data-sugg="' + k + '"><input type="text" data-sname="' + k + '" value="' +
      esc(g.name) + '"> <button type="button" data-accept="' + k + '">accept</button> ' +
      '<button type="button" data-dissolve="' + k + '">dissolve</button><div class="muted">' +
      esc(g.reason) + " · cosine " + g.cosine + "</div>" + g.members.map((i) =>
        '<div class="link" data-node="' + i + '"><span class="name">' + esc(name(i)) +
        "</span></div>").join("") + "</div>").join("") + "</details>";
  }
  function acceptSuggestion(k) {
    const g = P.sugg[k];
    if (!g || g.state !== "open") return -1;
    for (const i of g.members) if (!S.pinSet.has(i)) togglePin(i);
    group(g.name, g.members);
    g.state = "accepted";
    renderSuggestions();
    return S.supers.length - 1;
  }
  function dissolveSuggestion(k) {
    const g = P.sugg[k];
    if (!g || g.state !== "open") return;
    g.state = "dissolved";
    renderSuggestions();
  }

  function init() {
    const D = S.D;
    P.sugg = (D.suggest || []).map((g) => Object.assign({ state: "open" }, g));
    renderPaths();
    renderSuggestions();
    $("paths").addEventListener("click", (e) => {
      const el = e.target.closest("[data-path]");
      if (el) { const [a, b] = el.dataset.path.split(",").map(Number); highlightPath(a, b); }
    });
    const box = $("suggest");
    box.addEventListener("click", (e) => {
      const acc = e.target.closest("[data-accept]"), dis = e.target.closest("[data-dissolve]");
      if (acc) acceptSuggestion(+acc.dataset.accept);
      if (dis) dissolveSuggestion(+dis.dataset.dissolve);
    });
    box.addEventListener("input", (e) => {
      const el = e.target.closest("[data-sname]");
      if (el) P.sugg[+el.dataset.sname].name = el.value;
    });
  }
  api.onInit.push(init);
  Object.assign(api.panel, { superOf: superOf, togglePin: togglePin, renderSubgraph: renderSubgraph,
    search: search, nextMatch: nextMatch });
  Object.assign(api, {
    pin: (i) => togglePin(i), group: group, search: search, exportSubgraph: exportSubgraph,
    steerCommand: () => steerCommand(),
    highlightPath: highlightPath, acceptSuggestion: acceptSuggestion,
    dissolveSuggestion: dissolveSuggestion, suggestions: () => P.sugg,
    activePath: () => P.active,
  });
})();

// villi ui: the service map and the flows table, refreshed from /api (see server.py).
"use strict";

const COLOURS = {forwarded: "#31a413", dropped: "#c50000", audit: "#d98b00", mixed: "#7a3fb0"};
const $ = (id) => document.getElementById(id);
let cy = null;
let lastMap = {arrows: [], cards: []};
let lastFlows = [];
let rawFlows = [];

function query(extra) {
  const p = new URLSearchParams();
  const ns = $("namespace").value;
  if (ns) p.set("map_namespace", ns);
  if ($("verdict").value) p.set("verdict", $("verdict").value);
  if ($("pod").value.trim()) p.set("pod", $("pod").value.trim());
  if ($("label").value.trim()) p.set("label", $("label").value.trim());
  const range = $("range").value;
  if (range) p.set("since", String(Date.now() / 1000 - Number(range)));
  for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
  return p.toString();
}

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function epName(ep) {
  if (!ep) return "";
  if (ep.pod_name) return `${ep.namespace}/${ep.pod_name}`;
  const reserved = (ep.labels || []).find((l) => l.startsWith("reserved:"));
  return reserved || "";
}

function identityName(ep) {
  if (!ep) return "";
  const app = (ep.labels || []).find((l) => /(^|:)app=/.test(l));
  return `${ep.identity}${app ? " (" + app.replace(/^k8s:/, "") + ")" : ""}`;
}

function l4Of(flow) {
  const l4 = flow.l4 || {};
  const proto = Object.keys(l4)[0] || "";
  return {proto, body: l4[proto] || {}};
}

function l7Info(flow) {
  const http = (flow.l7 || {}).http;
  if (http) return `${http.method || ""} ${http.url || ""} ${http.code || ""}`.trim();
  const dns = (flow.l7 || {}).dns;
  if (dns) return `DNS ${dns.query || ""}`;
  return "";
}

function matchesText(flow) {
  const l7 = $("l7").value.trim().toLowerCase();
  if (l7) {
    const info = l7Info(flow).toLowerCase();
    const cls = ((flow.l7 || {}).http || {}).code ? String(flow.l7.http.code)[0] + "xx" : "";
    if (!info.includes(l7) && cls !== l7) return false;
  }
  const text = $("text").value.trim().toLowerCase();
  return !text || JSON.stringify(flow).toLowerCase().includes(text);
}

function renderMap(view) {
  lastMap = view;
  const elements = [];
  const nsSeen = new Set();
  for (const card of view.cards) {
    if (card.namespace && !nsSeen.has(card.namespace)) {
      nsSeen.add(card.namespace);
      elements.push({data: {id: "ns:" + card.namespace, label: card.namespace}, classes: "ns"});
    }
    const lines = [card.cluster ? `${card.name} · ${card.cluster}` : card.name];
    if (card.pods.length) lines.push(`${card.pods.length} pod${card.pods.length > 1 ? "s" : ""}`);
    for (const h of card.http.slice(0, 4)) lines.push(h);
    elements.push({data: {id: card.id, label: lines.join("\n"),
                          parent: card.namespace ? "ns:" + card.namespace : undefined},
                   classes: card.kind});
  }
  for (const a of view.arrows) {
    const l7 = [...a.methods, ...a.status_classes].join(" ");
    elements.push({data: {id: a.id, source: a.source, target: a.destination,
                          verdict: a.verdict, count: a.count,
                          label: `${a.port}/${a.protocol} ×${a.count}${l7 ? " " + l7 : ""}`},
                   classes: a.verdict});
  }
  if (!cy) {
    cy = cytoscape({container: $("map"), elements, maxZoom: 2, style: [
      {selector: "node", style: {"shape": "round-rectangle", "background-color": "#fff",
        "border-width": 1, "border-color": "#8893a8", "label": "data(label)",
        "text-wrap": "wrap", "text-valign": "center", "font-size": 11, "width": 150,
        "height": 46, "padding": 6}},
      {selector: "node.reserved", style: {"background-color": "#eef1f6"}},
      {selector: "node.ns", style: {"background-color": "#f4f6fb", "border-style": "dashed",
        "text-valign": "top", "font-weight": "bold", "padding": 18}},
      {selector: "edge", style: {"curve-style": "bezier", "target-arrow-shape": "triangle",
        "width": 2, "label": "data(label)", "font-size": 10, "text-rotation": "autorotate",
        "text-background-color": "#fff", "text-background-opacity": 0.8}},
      ...Object.entries(COLOURS).map(([v, c]) => ({selector: `edge.${v}`,
        style: {"line-color": c, "target-arrow-color": c, "color": c}})),
      {selector: "edge.mixed", style: {"line-style": "dashed"}},
    ]});
    cy.on("tap", "edge", (ev) => {
      const a = lastMap.arrows.find((x) => x.id === ev.target.id());
      if (a) explain(a.flow, a);
    });
    window.villiMap = cy;
  } else {
    cy.elements().remove();
    cy.add(elements);
  }
  cy.layout({name: "cose", animate: false, nodeDimensionsIncludeLabels: true,
             randomize: false, padding: 30, idealEdgeLength: () => 60,
             nodeRepulsion: () => 2500, nestingFactor: 0.6, gravity: 4,
             componentSpacing: 40}).run();
  cy.fit(undefined, 30);
  // small maps: readable cards rather than a fitted speck; large ones: pan and zoom
  const zoom = Math.min(1.1, Math.max(cy.zoom(), 0.8));
  if (zoom !== cy.zoom()) { cy.zoom(zoom); cy.center(); }
  const tbody = $("arrows").querySelector("tbody");
  tbody.replaceChildren(...view.arrows.map((a) => {
    const tr = document.createElement("tr");
    tr.dataset.arrow = a.id;
    tr.dataset.verdict = a.verdict;
    tr.className = "verdict-" + a.verdict;
    for (const v of [a.source, a.destination, `${a.port}/${a.protocol}`, a.verdict,
                     String(a.count), [...a.methods, ...a.status_classes].join(" "),
                     a.policies.join(", ")]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => explain(a.flow, a));
    return tr;
  }));
  const sel = $("namespace");
  const current = sel.value;
  const want = ["", ...view.namespaces];
  if ([...sel.options].map((o) => o.value).join() !== want.join() && !current) {
    sel.replaceChildren(...want.map((ns) => new Option(ns || "All namespaces", ns)));
    sel.value = current;
  }
}

function renderFlows(flows) {
  rawFlows = flows;
  lastFlows = flows.filter(matchesText).reverse();
  $("flow-count").textContent = `${lastFlows.length}`;
  const tbody = $("flows").querySelector("tbody");
  tbody.replaceChildren(...lastFlows.slice(0, 500).map((f, i) => {
    const {body} = l4Of(f);
    const flags = Object.keys(body.flags || {}).join(",");
    const tr = document.createElement("tr");
    tr.dataset.index = String(i);
    tr.dataset.verdict = f.verdict;
    for (const [v, cls] of [[epName(f.source), ""], [f.IP.source, ""],
                            [identityName(f.source), ""], [epName(f.destination), ""],
                            [f.IP.destination, ""], [identityName(f.destination), ""],
                            [body.destination_port ?? "", ""], [l7Info(f), ""],
                            [f.traffic_direction, ""], [f.verdict, "v-" + f.verdict],
                            [flags, ""], [f.time, ""]]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => explain(f));
    return tr;
  }));
}

async function explain(flow, arrow) {
  const ex = (flow.villi || {}).explain || {};
  $("explain").hidden = false;
  $("explain-text").textContent = ex.text || "no explanation recorded for this flow";
  const facts = {
    "Flow": `${epName(flow.source) || flow.IP.source} → ${epName(flow.destination) ||
             flow.IP.destination}`,
    "Verdict": flow.verdict + (flow.drop_reason_desc ? ` (${flow.drop_reason_desc})` : ""),
    "Direction": ex.direction || flow.traffic_direction,
    "Policy": ex.rule ? `${ex.rule.kind} ${ex.rule.namespace ? ex.rule.namespace + "/" : ""}` +
      `${ex.rule.name} ${ex.rule.section}` : (flow.verdict === "DROPPED" &&
      /default deny/.test(ex.text || "") ? "default deny" : "—"),
    "Node": flow.node_name,
  };
  if (arrow) facts["Arrow"] = `${arrow.count} flows: ${JSON.stringify(arrow.verdicts)}`;
  $("explain-facts").replaceChildren(...Object.entries(facts).flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dd.dataset.fact = k.toLowerCase();
    return [dt, dd];
  }));
  $("explain-yaml").textContent = "";
  if (ex.rule) {
    const p = new URLSearchParams({kind: ex.rule.kind, name: ex.rule.name,
                                   namespace: ex.rule.namespace || ""});
    try {
      $("explain-yaml").textContent = (await getJSON("/api/policy?" + p)).yaml;
    } catch (e) {
      $("explain-yaml").textContent = `(policy YAML unavailable: ${e.message})`;
    }
  }
}

async function refresh() {
  try {
    const view = await getJSON("/api/map?" + query());
    renderMap(view);
    const data = await getJSON("/api/flows?" + query());
    renderFlows(data.flows);
    const down = data.node_status.map((s) => s.node_names.join(",")).join(", ");
    $("status").textContent = `${data.flows.length} flows` +
      (down ? ` · not answering: ${down}` : "") + ` · ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("status").textContent = "error: " + e.message;
  }
}

for (const id of ["namespace", "range", "verdict"]) $(id).addEventListener("change", refresh);
for (const id of ["pod", "label"]) $(id).addEventListener("change", refresh);
for (const id of ["l7", "text"]) $(id).addEventListener("input", () => renderFlows(rawFlows));
$("refresh").addEventListener("click", refresh);
$("explain-close").addEventListener("click", () => { $("explain").hidden = true; });
setInterval(() => { if ($("live").checked) refresh(); }, 3000);
refresh();

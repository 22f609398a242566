// The ops dashboard: polls /dashboard/api/state once a second and redraws
// in place. No libraries; every value goes in through textContent.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 120;
const SVG_NS = "http://www.w3.org/2000/svg";
let updates = 0;

function $(id) { return document.getElementById(id); }

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(2)) + " " + units[i];
}

function fmtRate(n) { return n === null || n === undefined ? "–" : fmtBytes(n) + "/s"; }

function fmtNum(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, sec = s % 60;
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m ${sec}s`;
  if (m) return `${m}m ${sec}s`;
  return `${sec}s`;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function pill(text) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "pill " + text;
  span.textContent = text;
  td.appendChild(span);
  return td;
}

function fillTable(id, rows, columns, emptyText) {
  const body = $(id).querySelector("tbody");
  const frag = document.createDocumentFragment();
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(emptyText);
    td.colSpan = columns;
    tr.appendChild(td);
    frag.appendChild(tr);
  }
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c);
    frag.appendChild(tr);
  }
  body.replaceChildren(frag);
}

function drawChart(id, series, lines) {
  const fig = $(id);
  const svg = fig.querySelector("svg");
  const now = series.length ? series[series.length - 1].t : Date.now() / 1000;
  const pts = series.filter(p => p.t >= now - WINDOW_S);
  let max = 1;
  for (const p of pts) for (const l of lines) max = Math.max(max, p[l.key] || 0);
  const children = [];
  const axis = document.createElementNS(SVG_NS, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", "0"); axis.setAttribute("x2", "300");
  axis.setAttribute("y1", "69"); axis.setAttribute("y2", "69");
  children.push(axis);
  for (const l of lines) {
    const poly = document.createElementNS(SVG_NS, "polyline");
    poly.setAttribute("class", l.cls);
    poly.setAttribute("points", pts.map(p => {
      const x = 300 - (now - p.t) / WINDOW_S * 300;
      const y = 68 - (p[l.key] || 0) / max * 64;
      return x.toFixed(1) + "," + y.toFixed(1);
    }).join(" "));
    children.push(poly);
  }
  svg.replaceChildren(...children);
  fig.querySelector(".peak").textContent = `peak ${lines[0].fmt(max === 1 ? 0 : max)} · last ${WINDOW_S} s`;
  fig.dataset.points = String(pts.length);
  fig.dataset.lastT = pts.length ? String(pts[pts.length - 1].t) : "";
  const last = pts.length ? pts[pts.length - 1] : {};
  fig.querySelector(".now").textContent = lines.map(l => l.fmt(last[l.key] || 0)).join(" / ");
}

function render(s) {
  $("node-ip").textContent = s.node.nodeIp;
  $("node-subnet").textContent = s.node.nodeSubnet;
  $("node-key").textContent = s.node.nodePubkey;
  $("node-uptime").textContent = fmtDuration(s.now - s.node.nodeStartTime);

  fillTable("services", s.services.map(v => [
    cell(v.name), pill(v.health), cell(v.pid, "num"), cell(fmtDuration(v.uptime), "num"),
    cell(v.restarts, "num"), cell(v.lastSeen === null ? "never" : v.lastSeen + " s ago", "num"),
  ]), 6, "no services reported yet");

  $("peer-count").textContent = `(${s.peers.filter(p => p.state === "alive").length} alive of ${s.peers.length})`;
  fillTable("peers", s.peers.map(p => [
    cell(p.endpoint, "mono"), cell(p.type), pill(p.state), cell(p.cost, "num"),
    cell(fmtRate(p.rxRate), "num"), cell(fmtRate(p.txRate), "num"),
    cell(fmtBytes(p.rxBytes), "num"), cell(fmtBytes(p.txBytes), "num"),
  ]), 8, "no peers");

  const shown = s.routes.selected.length;
  $("route-count").textContent = shown < s.routes.total ? `(${shown} of ${s.routes.total})` : `(${s.routes.total})`;
  fillTable("routes", s.routes.selected.map(r => [
    cell(r.subnet, "mono"), cell(r.nextHop, "mono"), cell(r.metric, "num"), cell(r.seqno, "num"),
  ]), 4, "no selected routes");

  fillTable("drops", s.drops.map(d => [cell(d.service), cell(d.reason, "mono"), cell(d.count, "num")]), 3, "nothing dropped");

  drawChart("chart-bytes", s.series, [
    { key: "rxBytesPerSec", cls: "in", fmt: fmtRate }, { key: "txBytesPerSec", cls: "out", fmt: fmtRate }]);
  drawChart("chart-data", s.series, [
    { key: "dataPacketsInPerSec", cls: "in", fmt: fmtNum }, { key: "forwardedPerSec", cls: "out", fmt: fmtNum }]);
  drawChart("chart-control", s.series, [{ key: "controlPacketsInPerSec", cls: "in", fmt: fmtNum }]);
  drawChart("chart-drops", s.series, [{ key: "dropsPerSec", cls: "drop", fmt: fmtNum }]);

  const status = $("status");
  status.textContent = s.errors.length ? "partial: " + s.errors[0] : "live · " + new Date(s.now * 1000).toLocaleTimeString();
  status.className = "status " + (s.errors.length ? "bad" : "ok");
  updates += 1;
  document.body.dataset.updates = String(updates);
}

async function poll() {
  try {
    const resp = await fetch("/dashboard/api/state", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (err) {
    const status = $("status");
    status.textContent = "node API unreachable (" + err.message + "), retrying";
    status.className = "status bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();

// Skyline's dashboard: polls /ui/data and renders it. Every string from the catalog, the
// registry or the KV is written with textContent (never as markup): service names, platforms,
// tier names and reasons are user input.
"use strict";

const POLL_MS = 1500;
const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "skyline-admin-token";
const COLORS = { mesos: "#2b6cb0", kubernetes: "#805ad5", outbound: "#2b6cb0", inbound: "#38a169" };
const PALETTE = ["#dd6b20", "#319795", "#d53f8c", "#718096", "#b7791f", "#3182ce"];

// The admin token: from the fragment (/ui#token=...), which no server sees, then kept for
// this tab only and taken out of the address bar.
let token = null;
(function takeToken() {
  const hash = window.location.hash.replace(/^#/, "");
  const found = new URLSearchParams(hash).get("token");
  if (found) {
    token = found;
    try { window.sessionStorage.setItem(TOKEN_KEY, found); } catch (e) { /* storage off */ }
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  } else {
    try { token = window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { token = null; }
  }
})();

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function colorOf(name) {
  if (Object.prototype.hasOwnProperty.call(COLORS, name)) return COLORS[name];
  let h = 0;
  for (const c of String(name)) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function pct(share) {
  return Number(share).toFixed(1) + " %";
}

// A stacked bar of the shares, then a sparkline of the service's requests per sample.
function trafficCell(service, traffic) {
  const td = el("td", "traffic");
  if (!traffic.length) {
    td.appendChild(el("span", "muted", "no requests in the window"));
    return td;
  }
  const width = 220, height = 14;
  const bar = svg("svg", { class: "bar", width, height, viewBox: `0 0 ${width} ${height}` });
  let x = 0;
  for (const series of traffic) {
    const w = (width * series.share) / 100;
    const rect = svg("rect", { x, y: 0, width: w, height, fill: colorOf(series.name) });
    const title = svg("title");
    title.textContent = `${series.name}: ${pct(series.share)} (${series.requests} requests)`;
    rect.appendChild(title);
    bar.appendChild(rect);
    x += w;
  }
  td.appendChild(bar);
  const legend = el("span", "legend");
  for (const series of traffic) {
    const item = el("span", "share");
    item.setAttribute("data-service", service);
    item.setAttribute("data-series", series.name);
    const swatch = el("span", "swatch");
    swatch.style.background = colorOf(series.name);
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(`${series.name} ${pct(series.share)}`));
    legend.appendChild(item);
  }
  td.appendChild(legend);
  // Requests per sample, all series summed.
  const n = traffic[0].history.length;
  if (n > 1) {
    const sums = new Array(n).fill(0);
    for (const series of traffic) series.history.forEach((v, i) => { sums[i] += v; });
    const max = Math.max(1, ...sums);
    const w = 220, h = 24;
    const points = sums.map((v, i) => `${((i * w) / (n - 1)).toFixed(1)},${(h - 1 - (v * (h - 2)) / max).toFixed(1)}`);
    const spark = svg("svg", { class: "spark", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    spark.appendChild(svg("polyline", { points: points.join(" "), fill: "none", stroke: "#4a5568", "stroke-width": 1.5 }));
    td.appendChild(spark);
  }
  return td;
}

function tiersCell(tiers) {
  const td = el("td", "tiers");
  if (!tiers.length) td.appendChild(el("span", "muted", "–"));
  for (const tier of tiers) {
    let cls = "tier";
    if (tier.chosen) cls += " chosen";
    if (!tier.eligible) cls += " ineligible";
    const label = `${tier.name}${tier.platform && tier.platform !== tier.name ? " (" + tier.platform + ")" : ""}: ${tier.passing}/${tier.total}`;
    td.appendChild(el("span", cls, label));
  }
  return td;
}

function healthCell(service) {
  const td = el("td", "health");
  const h = service.health;
  if (!service.instances) {
    td.appendChild(el("span", "muted", "not in the catalog"));
    return td;
  }
  td.appendChild(el("span", "passing", `${h.passing} passing`));
  if (h.warning) { td.appendChild(document.createTextNode(" · ")); td.appendChild(el("span", "warning", `${h.warning} warning`)); }
  if (h.critical) { td.appendChild(document.createTextNode(" · ")); td.appendChild(el("span", "critical", `${h.critical} critical`)); }
  td.appendChild(el("div", "muted", `${service.nodes.length} node${service.nodes.length === 1 ? "" : "s"}`));
  return td;
}

function platformsCell(platforms) {
  const td = el("td", "platforms");
  if (!platforms.length) td.appendChild(el("span", "muted", "–"));
  for (const p of platforms) td.appendChild(el("span", "platform", p));
  return td;
}

function renderServices(data) {
  document.getElementById("traffic-head").textContent =
    `Traffic share per ${data.traffic_by} (last ${Math.round((data.samples * data.sample_seconds) / 60 * 10) / 10} min)`;
  document.getElementById("window").textContent =
    `Counts sampled every ${data.sample_seconds} s, kept ${data.window_seconds / 60} minutes; the share counts requests ${data.role === "gateway" ? "the gateway sent to each tier's platform" : "this agent's listeners answered"}.`;
  const rows = [];
  for (const service of data.services) {
    const tr = el("tr");
    tr.setAttribute("data-service", service.name);
    tr.appendChild(el("td", "name", service.name));
    tr.appendChild(tiersCell(service.tiers));
    tr.appendChild(healthCell(service));
    tr.appendChild(platformsCell(service.platforms));
    tr.appendChild(trafficCell(service.name, service.traffic));
    tr.appendChild(el("td", "requests", service.requests));
    rows.push(tr);
  }
  document.getElementById("service-rows").replaceChildren(...rows);
  document.getElementById("more").textContent =
    data.services_not_listed ? `${data.services_not_listed} more services not listed.` : "";
}

function summary(t) {
  if (!t) return "–";
  const rate = t.error_percent === undefined ? "" : ` (${Number(t.error_percent).toFixed(1)} %)`;
  return `${t.answers} answers, ${t.failed} failed${rate}` + (t.p99_ms === null || t.p99_ms === undefined ? "" : `, p99 ${t.p99_ms} ms`);
}

function time(unix) {
  return unix ? new Date(unix * 1000).toLocaleTimeString() : "–";
}

function renderMigration(m) {
  const box = el("div", "migration");
  box.setAttribute("data-service", m.service);
  const h3 = el("h3", null, `${m.service}: ${m.from} → ${m.to}`);
  h3.appendChild(el("span", `state ${m.state}`, m.state));
  box.appendChild(h3);
  const steps = el("div", "steps");
  m.steps.forEach((s, i) => {
    let cls = "step";
    if (i < m.step || m.state === "done") cls += " done";
    if (i === m.step && m.state !== "done" && m.state !== "rolled_back") cls += " current";
    steps.appendChild(el("span", cls, s === 0 ? `shadow ${m.shadow || 0}%` : `${s}%`));
  });
  box.appendChild(steps);
  const dl = el("dl");
  const row = (k, v) => { dl.appendChild(el("dt", null, k)); dl.appendChild(el("dd", null, v)); };
  row("step", `step ${m.step + 1}/${m.steps.length}`);
  row(`share to ${m.to}`, `${m.share}%`);
  row("guards", `error rate ≤ ${(m.guards.max_error_rate * 100).toFixed(1)}%, p99 ≤ ${m.guards.max_p99_ratio}× ${m.from}'s, judged after ${m.guards.min_requests} requests`);
  row("step time", `${m.step_time_ms / 1000} s, step started ${time(m.step_started_at)}`);
  if (m.observed) {
    row(`last reading (step ${m.observed.step + 1}, ${Number(m.observed.seconds).toFixed(1)} s)`, "");
    row(m.from, summary(m.observed.from));
    row(m.to, summary(m.observed.to));
    if (m.observed.shadow) row("shadow", `${m.observed.shadow.compared} compared, ${m.observed.shadow.differ} differed`);
  } else {
    row("last reading", "none yet");
  }
  if (m.live) {
    row(`live, since the migration started (${m.live.gateways} gateway${m.live.gateways === 1 ? "" : "s"})`, "");
    for (const [tier, t] of Object.entries(m.live.tiers || {})) {
      row(tier, summary(t));
    }
  }
  if (m.reason) row("reason", m.reason);
  row("updated", time(m.updated_at));
  box.appendChild(dl);
  return box;
}

function renderMigrations(data) {
  const boxes = (data.migrations || []).map(renderMigration);
  document.getElementById("autopilot").replaceChildren(...boxes);
  const empty = document.getElementById("autopilot-empty");
  if (!data.registry) empty.textContent = "This role follows no registry: no migration records to show.";
  else if (data.migrations_error) empty.textContent = `Cannot read the migration records: ${data.migrations_error}`;
  else empty.textContent = boxes.length ? "" : "No migration recorded in the registry.";
}

let polls = 0;

function setStatus(text, error) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "status error" : "status";
  status.setAttribute("data-polls", String(polls));
}

async function poll() {
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch("/ui/data", { headers, cache: "no-store", credentials: "omit" });
    if (response.status === 401) {
      setStatus("this admin listener needs its token: open /ui#token=<token>", true);
    } else if (!response.ok) {
      setStatus(`the admin listener answered ${response.status}`, true);
    } else {
      const data = await response.json();
      polls += 1;
      document.getElementById("role").textContent = data.role;
      renderServices(data);
      renderMigrations(data);
      setStatus(`updated ${time(data.now)}`, false);
    }
  } catch (e) {
    setStatus(`cannot reach the admin listener: ${e}`, true);
  }
  window.setTimeout(poll, POLL_MS);
}

poll();

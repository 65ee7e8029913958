// omi-swarm dashboard: polls the read-only JSON API and updates the page in place.
// Data is only ever put into the page with textContent / element properties, never as HTML,
// so a volunteer's display name is shown as the text it is.
"use strict";

const POLL_MS = 2000;          // status and history
const SLOW_EVERY = 3;          // contributors and checkpoints every 3rd poll
const MAX_BACKOFF_MS = 10000;  // while the coordinator is unreachable
const RECENT_PREVIEWS = 8;

const fmtInt = new Intl.NumberFormat("en-US");
const fmt1 = new Intl.NumberFormat("en-US", {maximumFractionDigits: 1});

const omi = window.omiDashboard = {
  run: null, status: null, contributors: [], checkpoints: [],
  dataCard: undefined,  // the run's data card once asked for: an object, or null for a run without one
  history: {since: 0, t: [], loss: [], throughput: [], volunteers: []},
  charts: {}, sort: {key: "samples", dir: -1}, polls: 0, failures: 0, lastOk: 0,
};

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);  // strings are appended as text nodes
  return node;
}

function setText(id, value) {
  const node = $(id);
  if (node.textContent !== value) node.textContent = value;
}

async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (response.status === 404) {
    const error = new Error((await response.json()).detail || "not found");
    error.notFound = true;
    throw error;
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${fmt1.format(n)} ${units[i]}`;
}

function connection(ok, detail) {
  const node = $("connection");
  node.classList.toggle("offline", !ok);
  node.textContent = ok ? `live · updated ${new Date().toLocaleTimeString()}` : detail;
}

// ------------------------------------------------------------------ overview (/)

function runCard(run) {
  return el("a", {class: "run-card", href: `/runs/${encodeURIComponent(run.run_id)}`, "data-run": run.run_id},
    el("div", {class: "title"}, el("h2", {text: run.name || run.run_id}),
       el("span", {class: `state ${run.state}`, text: run.state})),
    el("div", {class: "subtitle", text: `model ${run.model} · run id ${run.run_id}`}),
    el("dl", {class: "figures small"},
       ...[["round", fmtInt.format(run.round)], ["samples trained", fmtInt.format(run.total_samples)],
           ["volunteers online", fmtInt.format(run.volunteers_online)],
           ["samples / s", fmt1.format(run.samples_per_second)]]
         .map(([k, v]) => el("div", {}, el("dt", {text: k}), el("dd", {text: v})))));
}

async function pollOverview() {
  const runs = await getJSON("/api/runs");
  $("runs").replaceChildren(...runs.map(runCard));
  $("no-runs").hidden = runs.length > 0;
}

// ------------------------------------------------------------------ one run (/runs/{run})

function renderStatus(s) {
  document.title = `${s.name || s.run_id} · omi-swarm`;
  setText("run-name", s.name || s.run_id);
  setText("run-model", s.model);
  setText("run-id", s.run_id);
  const state = $("run-state");
  state.className = `state ${s.state}`;
  setText("run-state", s.state);
  setText("round", fmtInt.format(s.round));
  setText("total-samples", fmtInt.format(s.total_samples));
  setText("volunteers-online", fmtInt.format(s.volunteers_online));
  setText("samples-per-second", fmt1.format(s.samples_per_second));
  setText("loss", s.loss == null ? "–" : s.loss.toFixed(4));
  setText("verified-samples", fmtInt.format(s.verified_samples));
  setText("audits", `${fmtInt.format(s.audits.passed)} / ${fmtInt.format(s.audits.failed)}`);
  setText("verified-note", verifiedNote(s));
}

// What "verified" means for this run right now, from the audit counts the coordinator keeps.
function verifiedNote(s) {
  const a = s.audits;
  const decided = a.passed + a.failed;
  const waiting = a.pending + a.assigned + a.awaiting_records + (a.disputed || 0);
  const waitingText = waiting ? ` ${fmtInt.format(waiting)} drawn audit(s) are waiting for records or a validator; ` +
    "the work beside them stays provisional until they run." : "";
  if (!decided) {
    return "No audit has run for this run yet: every sample is provisional (not verified)." + waitingText;
  }
  return `Verified samples come from ${fmtInt.format(decided)} audit(s) that ran (${fmtInt.format(a.passed)} passed, ` +
    `${fmtInt.format(a.failed)} failed).` + waitingText;
}

function makeChart(id, label, color, series) {
  const target = $(id);
  const opts = {
    width: Math.max(240, target.clientWidth), height: 180, legend: {show: false},
    cursor: {drag: {x: false, y: false}},
    scales: {x: {time: true}},
    axes: [{stroke: "#667"}, {stroke: "#667", size: 56}],
    series: [{}, {label, stroke: color, width: 2, fill: color + "22", spanGaps: true, points: {show: false}}],
  };
  return new uPlot(opts, series, target);
}

function ensureCharts() {
  if (omi.charts.loss || typeof uPlot === "undefined") return;
  const h = omi.history;
  omi.charts.loss = makeChart("chart-loss", "loss", "#d0481f", [h.t, h.loss]);
  omi.charts.throughput = makeChart("chart-throughput", "samples/s", "#2a7ab0", [h.t, h.throughput]);
  omi.charts.volunteers = makeChart("chart-volunteers", "volunteers", "#3a9a5b", [h.t, h.volunteers]);
  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(omi.charts)) {
      chart.setSize({width: Math.max(240, $(`chart-${name}`).clientWidth), height: 180});
    }
  });
}

function renderHistory(view) {
  const h = omi.history;
  for (const p of view.points) {
    if (h.t.length && p.at_ms / 1000 <= h.t[h.t.length - 1]) continue;
    h.t.push(p.at_ms / 1000);
    h.loss.push(p.loss);
    h.throughput.push(p.samples_per_second);
    h.volunteers.push(p.volunteers_online);
  }
  h.since = Math.max(h.since, view.next_since_ms);
  ensureCharts();
  if (view.points.length && omi.charts.loss) {
    omi.charts.loss.setData([h.t, h.loss]);
    omi.charts.throughput.setData([h.t, h.throughput]);
    omi.charts.volunteers.setData([h.t, h.volunteers]);
  }
  $("history-empty").hidden = h.t.length > 0;
}

function sortRows(rows) {
  const {key, dir} = omi.sort;
  const value = (r) => key === "display_name" ? (r.display_name || r.short_id).toLowerCase() : r[key];
  return [...rows].sort((a, b) => {
    const x = value(a), y = value(b);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || a.node_id.localeCompare(b.node_id);
  });
}

function renderContributors() {
  const rows = sortRows(omi.contributors).map((c) => el("tr", {"data-node": c.node_id},
    el("td", {class: "volunteer"},
       el("span", {class: c.banned ? "dot banned" : c.online ? "dot online" : "dot", title:
                   c.banned ? "banned" : c.online ? "online" : "offline"}),
       el("span", {class: "name", text: c.display_name || "anonymous"}),
       el("code", {class: "node-id", text: c.short_id, title: c.node_id})),
    el("td", {class: "num", text: fmtInt.format(c.samples)}),
    el("td", {class: "num", text: fmtInt.format(c.verified_samples)}),
    el("td", {class: "num", text: fmtInt.format(c.audits_passed)}),
    el("td", {class: "num" + (c.audits_failed ? " bad" : ""), text: fmtInt.format(c.audits_failed)}),
    el("td", {class: "num", text: c.utilization == null ? "–" : `${Math.round(100 * c.utilization)} %`}),
    el("td", {class: "num", text: c.micro_batches_per_contribution == null ? "–"
                                  : fmt1.format(c.micro_batches_per_contribution)}),
    el("td", {class: "num", text: c.bytes_per_sample == null ? "–" : fmtInt.format(Math.round(c.bytes_per_sample))}),
    el("td", {text: c.online ? "now" : ago(c.last_seen_ms), title: new Date(c.last_seen_ms).toLocaleString()})));
  $("contributors").tBodies[0].replaceChildren(...rows);
  $("contributors-empty").hidden = omi.contributors.length > 0;
  for (const th of $("contributors").tHead.rows[0].cells) {
    const active = th.dataset.key === omi.sort.key;
    th.setAttribute("aria-sort", active ? (omi.sort.dir > 0 ? "ascending" : "descending") : "none");
  }
}

function renderCheckpoints() {
  const list = omi.checkpoints;
  const rows = [...list].reverse().map((c) => {
    const links = el("td", {class: "links"},
      el("a", {href: c.manifest_url, text: "manifest.json", download: ""}));
    for (const f of c.files) {
      if (f.name === "manifest.json") continue;
      links.append(" ", el("a", {href: f.url, text: f.name, download: "", title: `sha256 ${f.sha256}`}));
    }
    return el("tr", {"data-round": String(c.round)},
      el("td", {class: "num", text: fmtInt.format(c.round) + (c.milestone ? " ★" : "")}),
      el("td", {class: "num", text: fmtInt.format(c.total_samples)}),
      el("td", {text: new Date(c.created_at_ms).toLocaleString()}),
      el("td", {class: "num", text: bytes(c.size_bytes)}),
      el("td", {}, el("code", {class: "sha", text: c.manifest_sha256})),
      links);
  });
  $("checkpoints").tBodies[0].replaceChildren(...rows);
  $("checkpoints-empty").hidden = list.length > 0;

  const withPreview = list.filter((c) => c.preview_url).slice(-RECENT_PREVIEWS).reverse();
  $("previews").replaceChildren(...withPreview.map((c, i) => el("figure", {class: i === 0 ? "latest" : "recent"},
    el("img", {src: c.preview_url, alt: `samples at round ${c.round}`, loading: "lazy"}),
    el("figcaption", {text: `${i === 0 ? "latest · " : ""}round ${fmtInt.format(c.round)}`}))));
  $("previews-empty").hidden = withPreview.length > 0;
  renderPreviewPrompts(withPreview[0]);
}

// The prompts of a text-to-image grid, one table row per grid row, so each sits where its image does.
function renderPreviewPrompts(checkpoint) {
  const prompts = checkpoint ? checkpoint.preview_prompts : [];
  const columns = (checkpoint && checkpoint.preview_columns) || prompts.length;
  const rows = [];
  for (let i = 0; i < prompts.length; i += columns) {
    rows.push(el("tr", {}, ...prompts.slice(i, i + columns).map((prompt) => el("td", {text: prompt}))));
  }
  $("preview-prompts").querySelector("tbody").replaceChildren(...rows);
  if (checkpoint) setText("preview-prompts-round", `round ${fmtInt.format(checkpoint.round)}`);
  $("preview-prompts").hidden = prompts.length === 0;
}

// A run without a prepared data set answers 404 here (null): its Data section stays hidden.
async function getDataCard(run) {
  const response = await fetch(`/api/runs/${run}/data-card`, {cache: "no-store"});
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`data card: HTTP ${response.status}`);
  return response.json();
}

function renderDataCard() {
  const d = omi.dataCard;
  $("data").hidden = !d;
  if (!d) return;
  setText("data-name", d.name);
  setText("data-source", d.source);
  setText("data-license-terms", d.license_terms);
  setText("data-filtering", d.filtering || "not stated");
  setText("data-caption-origin", d.caption_origin || "not stated");
  setText("data-size", `${fmtInt.format(d.samples)} samples in ${fmtInt.format(d.shards)} shards, ` +
                       `${d.resolution}×${d.resolution} pixels, prepared for ${d.model}`);
  setText("data-parts", d.parts_sha256);
  setText("data-manifest-sha", d.manifest_sha256);
  const licenses = Object.entries(d.licenses).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  $("data-licenses").tBodies[0].replaceChildren(...licenses.map(([license, n]) => el("tr", {},
    el("td", {text: license}), el("td", {class: "num", text: fmtInt.format(n)}),
    el("td", {class: "num", text: `${fmt1.format(100 * n / Math.max(d.samples, 1))} %`}))));
  const refused = Object.entries(d.refused).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  $("data-refused").tBodies[0].replaceChildren(...refused.map(([reason, n]) => el("tr", {},
    el("td", {text: reason}), el("td", {class: "num", text: fmtInt.format(n)}))));
  $("data-refused").hidden = refused.length === 0;
  $("data-refused-none").hidden = refused.length > 0;
  $("data-card-link").href = d.card_url || "#";
  $("data-card-link").hidden = !d.card_url;
  $("data-manifest-link").href = d.manifest_url;
}

async function pollRun() {
  const run = encodeURIComponent(omi.run);
  const slow = omi.polls % SLOW_EVERY === 0;
  const [status, history, contributors, checkpoints, dataCard] = await Promise.all([
    getJSON(`/api/runs/${run}/status`),
    getJSON(`/api/runs/${run}/history?since=${omi.history.since}`),
    slow ? getJSON(`/api/runs/${run}/contributors`) : null,
    slow ? getJSON(`/api/runs/${run}/checkpoints`) : null,
    omi.dataCard === undefined ? getDataCard(run) : undefined,  // a run's data set never changes: asked once
  ]);
  omi.status = status;
  renderStatus(status);
  renderHistory(history);
  if (contributors) { omi.contributors = contributors; renderContributors(); }
  if (checkpoints) { omi.checkpoints = checkpoints; renderCheckpoints(); }
  if (dataCard !== undefined) { omi.dataCard = dataCard; renderDataCard(); }
}

// ------------------------------------------------------------------ polling loop

async function loop(poll) {
  for (;;) {
    let wait = POLL_MS;
    try {
      await poll();
      omi.polls++;
      omi.failures = 0;
      omi.lastOk = Date.now();
      connection(true);
    } catch (error) {
      if (error.notFound) {
        $("run").hidden = true;
        $("missing").hidden = false;
        $("missing-text").textContent = error.message;
        connection(true);
      } else {
        // coordinator restarting or unreachable: keep the page as it is and try again with backoff
        omi.failures++;
        omi.polls = 0;  // refresh everything once it is back
        wait = Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** Math.min(omi.failures - 1, 3));
        connection(false, `coordinator unreachable, retrying in ${Math.round(wait / 1000)} s` +
                          (omi.lastOk ? ` (last update ${ago(omi.lastOk)})` : ""));
      }
    }
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

function start() {
  const match = location.pathname.match(/^\/runs\/([^/]+)\/?$/);
  if (match) {
    omi.run = decodeURIComponent(match[1]);
    $("run").hidden = false;
    for (const th of $("contributors").tHead.rows[0].cells) {
      th.tabIndex = 0;
      const sortBy = () => {
        const key = th.dataset.key;
        omi.sort = {key, dir: omi.sort.key === key ? -omi.sort.dir : (th.dataset.type === "text" ? 1 : -1)};
        renderContributors();
      };
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(); } });
    }
    loop(pollRun);
  } else {
    $("overview").hidden = false;
    loop(pollOverview);
  }
}

document.addEventListener("DOMContentLoaded", start);

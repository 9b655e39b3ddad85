// The gateway's live status page: polls /admin/status.json once a second and draws it with uPlot.
// Counters become rates and histogram buckets become percentiles here, from one poll to the next.
"use strict";

(function () {
  const POLL_MS = 1000;
  const KEEP_POINTS = 300; // five minutes at one poll a second
  const ZONES = ["raw", "quarantine", "curated"];
  const COLORS = { in: "#1f77b4", raw: "#2ca02c", quarantine: "#d62728", curated: "#9467bd", refused: "#ff7f0e", p50: "#2ca02c", p90: "#ff7f0e", p99: "#d62728" };

  const state = { polls: 0, lastError: null, prev: null, history: [], charts: {}, series: {} };
  window.edgeStatus = state; // read by the browser test, handy in a console

  function token() {
    const m = location.hash.match(/token=([^&]+)/);
    if (m) {
      sessionStorage.setItem("edgeGatewayToken", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname); // keep the token out of the address bar
    }
    return sessionStorage.getItem("edgeGatewayToken");
  }

  function chart(id, series, axisLabel, fmt) {
    const el = document.getElementById(id);
    const opts = {
      width: Math.max(320, el.clientWidth || 540),
      height: 220,
      series: [{}].concat(series.map(([label, color]) => ({ label, stroke: color, width: 2, value: (u, v) => (v == null ? "–" : fmt(v)) }))),
      axes: [{}, { label: axisLabel, size: 60, values: (u, vals) => vals.map(fmt) }],
      scales: { x: { time: true } },
      legend: { live: true },
    };
    const data = [[]].concat(series.map(() => []));
    const plot = new uPlot(opts, data, el);
    state.charts[id] = plot;
    state.series[id] = data;
    return plot;
  }

  const num = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));
  const mib = (v) => (v / 1048576).toFixed(1);
  const pct = (v) => v.toFixed(1) + "%";

  function build() {
    chart("c-throughput", [["in (accepted)", COLORS.in], ["landed raw", COLORS.raw], ["landed curated", COLORS.curated], ["landed quarantine", COLORS.quarantine], ["refused", COLORS.refused]], "records/s", num);
    chart("c-latency", [["p50", COLORS.p50], ["p90", COLORS.p90], ["p99", COLORS.p99]], "ms", num);
    chart("c-wal", [["fill", COLORS.in]], "% of capacity", pct);
    chart("c-age", ZONES.map((z) => [z, COLORS[z]]), "seconds", num);
    chart("c-backlog", ZONES.map((z) => [z, COLORS[z]]), "MiB", mib);
    chart("c-batch", [["records per call", COLORS.in], ["concurrency limit", COLORS.curated], ["calls in flight", COLORS.raw], ["deferred/s", COLORS.refused]], "", num);
  }

  function rate(now, prev, get) {
    if (!prev) return null;
    const dt = now.t - prev.t;
    if (dt <= 0) return null;
    return Math.max(0, (get(now) - get(prev)) / dt);
  }

  const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);

  // Prometheus-style: the bucket where the q-th observation falls, interpolated linearly within it.
  function quantile(q, now, prev) {
    if (!prev) return null;
    const before = new Map(prev.ack_buckets.map(([le, n]) => [le, n]));
    const deltas = now.ack_buckets.map(([le, n]) => [le, n - (before.get(le) || 0)]);
    const total = deltas.length ? deltas[deltas.length - 1][1] : 0;
    if (total <= 0) return null;
    const target = q * total;
    let lower = 0, below = 0;
    for (const [le, cum] of deltas) {
      if (cum >= target) {
        if (!isFinite(le)) return lower * 1000;
        return (lower + (le - lower) * ((target - below) / Math.max(cum - below, 1e-9))) * 1000;
      }
      lower = le; below = cum;
    }
    return lower * 1000;
  }

  function push(id, t, values) {
    const data = state.series[id];
    data[0].push(t);
    values.forEach((v, i) => data[i + 1].push(v));
    if (data[0].length > KEEP_POINTS) data.forEach((s) => s.shift());
    state.charts[id].setData(data);
  }

  function table(id, rows) {
    const body = document.querySelector(`#${id} tbody`);
    body.innerHTML = "";
    for (const cells of rows) {
      const tr = document.createElement("tr");
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = c;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  function minuteAgo(now) {
    // The oldest snapshot no more than a minute old: "recent" counts come from it.
    return state.history.find((s) => now.t - s.t <= 60) || state.history[0];
  }

  function recent(now, pick) {
    const then = minuteAgo(now);
    const all = pick(now), old = then ? pick(then) : {};
    return Object.keys(all).sort().map((k) => [k, (all[k] - (old[k] || 0)).toFixed(0), all[k].toFixed(0)]);
  }

  function draw(now) {
    const prev = state.prev;
    const t = now.t;
    const accepted = rate(now, prev, (s) => s.records.accepted || 0);
    const landed = (z) => rate(now, prev, (s) => s.landed[z] || 0);
    const refused = rate(now, prev, (s) => sum(s.refusals));
    push("c-throughput", t, [accepted, landed("raw"), landed("curated"), landed("quarantine"), refused]);
    const p99 = quantile(0.99, now, prev);
    push("c-latency", t, [quantile(0.5, now, prev), quantile(0.9, now, prev), p99]);
    const fill = now.wal.capacity ? (100 * now.wal.bytes) / now.wal.capacity : 0;
    push("c-wal", t, [fill]);
    push("c-age", t, ZONES.map((z) => (now.zones[z] ? now.zones[z].oldest_age_secs : null)));
    push("c-backlog", t, ZONES.map((z) => (now.zones[z] ? now.zones[z].backlog_bytes : null)));
    const calls = prev ? now.batch.count - prev.batch.count : 0;
    const perCall = calls > 0 ? (now.batch.sum - prev.batch.sum) / calls : null;
    const eps = Object.values(now.endpoints);
    push("c-batch", t, [
      perCall,
      eps.length ? eps.reduce((a, e) => a + e.concurrency_limit, 0) : null,
      eps.length ? eps.reduce((a, e) => a + e.in_flight, 0) : null,
      rate(now, prev, (s) => sum(s.deferrals)),
    ]);
    table("t-endpoints", Object.entries(now.endpoints).map(([name, e]) => [name, e.concurrency_limit.toFixed(0), e.in_flight.toFixed(0)]));
    table("t-deferrals", recent(now, (s) => s.deferrals));
    table("t-refusals", recent(now, (s) => s.refusals));
    document.getElementById("gateway-id").textContent = now.gateway_id || "";
    document.getElementById("s-accepted").textContent = accepted == null ? "–" : num(accepted);
    const raw = landed("raw");
    document.getElementById("s-landed").textContent = raw == null ? "–" : num(raw);
    document.getElementById("s-p99").textContent = p99 == null ? "–" : num(p99);
    document.getElementById("s-wal").textContent = pct(fill);
    document.getElementById("s-workers").textContent = `${now.workers.up}/${now.workers.total}`;
    document.getElementById("s-devices").textContent = now.devices.toFixed(0);
    const st = document.getElementById("s-state");
    st.textContent = now.draining ? "draining" : "";
    st.className = now.draining ? "draining" : "";
  }

  async function poll() {
    const tok = token();
    if (!tok) {
      document.getElementById("token-form").hidden = false;
      return;
    }
    try {
      const resp = await fetch("/admin/status.json", { headers: { Authorization: `Bearer ${tok}` }, cache: "no-store" });
      if (resp.status === 401) {
        sessionStorage.removeItem("edgeGatewayToken");
        document.getElementById("token-form").hidden = false;
        throw new Error("the token was refused");
      }
      if (!resp.ok) throw new Error(`status.json answered ${resp.status}`);
      const now = await resp.json();
      draw(now);
      state.prev = now;
      state.history.push(now);
      while (state.history.length && now.t - state.history[0].t > 70) state.history.shift();
      state.polls += 1;
      state.lastError = null;
      document.getElementById("error").hidden = true;
    } catch (err) {
      state.lastError = String(err);
      const el = document.getElementById("error");
      el.textContent = `Cannot update: ${err.message || err}`;
      el.hidden = false;
    }
  }

  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("edgeGatewayToken", document.getElementById("token").value.trim());
    document.getElementById("token-form").hidden = true;
    poll();
  });

  build();
  poll();
  setInterval(poll, POLL_MS);
})();

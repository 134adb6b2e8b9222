// tunelab dashboard: sortable, filterable runs table; a run's curves (polled while it trains); the predictions filter.
(function () {
  "use strict";

  function runsTable() {
    const table = document.getElementById("runs");
    if (!table) return;
    const rows = () => Array.from(table.tBodies[0].rows);
    const filter = document.getElementById("filter");
    filter.addEventListener("input", () => {
      const text = filter.value.toLowerCase();
      let shown = 0;
      rows().forEach((row) => { const hit = row.textContent.toLowerCase().includes(text); row.hidden = !hit; shown += hit; });
      document.getElementById("count").textContent = shown + " runs";
    });
    table.tHead.querySelectorAll("th[data-sort]").forEach((th, column) => {
      th.addEventListener("click", () => {
        const down = th.dataset.dir !== "down";
        th.dataset.dir = down ? "down" : "up";
        const key = (row) => { const v = row.cells[column].dataset.value; const n = parseFloat(v); return isNaN(n) ? v : n; };
        const sorted = rows().sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (down ? -1 : 1));
        sorted.forEach((row) => table.tBodies[0].appendChild(row));
      });
    });
  }

  function draw(svg, points, name) {
    const w = 640, h = 240, pad = 36;
    svg.innerHTML = "";
    if (points.length === 0) return;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
    const sy = (y) => h - pad - ((y - y0) / (y1 - y0 || 1)) * (h - 2 * pad);
    const ns = "http://www.w3.org/2000/svg";
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
    line.dataset.points = String(points.length);
    svg.appendChild(line);
    const label = (x, y, text) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = text; svg.appendChild(t); };
    label(4, pad - 8, name + "  max " + y1.toPrecision(4));
    label(4, h - 8, "min " + y0.toPrecision(4) + "   step " + x0 + " → " + x1);
  }

  function curves() {
    const box = document.getElementById("curves");
    if (!box) return;
    const svg = document.getElementById("chart"), select = document.getElementById("series");
    const records = [];
    const every = parseFloat(new URLSearchParams(location.search).get("poll") || "3") * 1000;
    function series() {
      const names = new Set();
      records.forEach((r) => Object.keys(r).forEach((k) => { if (k !== "step" && typeof r[k] === "number") names.add(k); }));
      return Array.from(names).sort();
    }
    function render() {
      const names = series(), chosen = select.value || (names.includes("loss") ? "loss" : names[0]);
      if (select.options.length !== names.length) {
        select.innerHTML = names.map((n) => "<option" + (n === chosen ? " selected" : "") + ">" + n + "</option>").join("");
      }
      draw(svg, records.filter((r) => typeof r[chosen] === "number" && typeof r.step === "number").map((r) => [r.step, r[chosen]]), chosen || "");
    }
    function poll() {
      fetch("/api/metrics/" + box.dataset.run + "?after=" + records.length)
        .then((r) => r.json())
        .then((body) => { records.push(...body.records); render(); if (box.dataset.live === "true" || body.status === "running") setTimeout(poll, every); });
    }
    select.addEventListener("change", render);
    poll();
  }

  function predictions() {
    const box = document.getElementById("changed-only");
    if (!box) return;
    box.addEventListener("change", () => {
      document.querySelectorAll("#predictions tr.prediction").forEach((row) => { row.hidden = box.checked && !row.classList.contains("changed"); });
    });
  }

  function post(url, body) {
    return fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then((r) => r.json().then((data) => ({ ok: r.ok, data })));
  }

  function launch() {
    const form = document.getElementById("launch");
    if (!form) return;
    const request = () => ({ preset: document.getElementById("preset").value || null,
      config_text: document.getElementById("config-text").value || null, overrides: document.getElementById("overrides").value });
    const plan = document.getElementById("plan"), start = document.getElementById("start");
    document.getElementById("check").addEventListener("click", () => {
      plan.textContent = "checking ...";
      start.disabled = true;
      post("/api/plan", request()).then(({ ok, data }) => {
        plan.textContent = ok ? data.text : data.detail;
        start.disabled = !(ok && data.ok);
        plan.dataset.verdict = ok && data.ok ? "ok" : "refused";
      });
    });
    start.addEventListener("click", () => {
      start.disabled = true;
      post("/api/jobs", request()).then(({ ok, data }) => { if (!ok) plan.textContent = data.detail; jobs(); });
    });
    function progressOf(p) {  // a bar once the job trains (step of total), else the phase in words
      const cell = document.createElement("span");
      cell.className = "progress";
      if (p.total) {
        const bar = document.createElement("progress");
        bar.max = p.total; bar.value = p.step;
        cell.appendChild(bar);
        cell.dataset.step = p.step; cell.dataset.total = p.total;
      }
      cell.appendChild(document.createTextNode(" " + (p.total ? `step ${p.step}/${p.total} · ` : "") + p.phase));
      return cell;
    }
    function jobs() {
      fetch("/api/jobs").then((r) => r.json()).then((list) => {
        const body = document.querySelector("#jobs tbody");
        body.innerHTML = "";
        list.forEach((job) => {
          const row = body.insertRow();
          row.className = "job " + job.status;
          row.dataset.status = job.status;
          row.dataset.job = job.id; row.dataset.config = job.config;
          [String(job.id), job.config, job.status].forEach((text) => { row.insertCell().textContent = text; });
          row.insertCell().appendChild(progressOf(job.progress));
          const link = row.insertCell();
          if (job.run) { const a = document.createElement("a"); a.href = "/run/" + job.run; a.textContent = job.run; link.appendChild(a); }
          const action = row.insertCell();
          if (job.status === "queued" || job.status === "running") {
            const b = document.createElement("button"); b.textContent = "cancel"; b.className = "cancel";
            b.addEventListener("click", () => post("/api/jobs/" + job.id + "/cancel", {}).then(jobs)); action.appendChild(b);
          }
        });
        if (list.length) document.getElementById("job-log").textContent = list[list.length - 1].log;
        if (list.some((j) => j.status === "queued" || j.status === "running")) setTimeout(jobs, 1500);
      });
    }
    jobs();
  }

  function chat() {
    const form = document.getElementById("chat");
    if (!form) return;
    const status = document.getElementById("chat-status");
    document.getElementById("send").addEventListener("click", () => {
      const a = document.getElementById("model-a"), b = document.getElementById("model-b");
      const models = [a.value, b.value].filter((m) => m);
      status.textContent = "thinking ...";
      ["a", "b"].forEach((k) => { document.getElementById("answer-" + k).textContent = ""; document.getElementById("label-" + k).textContent = ""; });
      post("/api/chat", { models, prompt: document.getElementById("prompt").value, system: document.getElementById("system").value }).then(({ ok, data }) => {
        status.textContent = ok ? "" : data.detail;
        if (!ok) return;
        data.answers.forEach((text, i) => {
          const k = i === 0 ? "a" : "b", select = i === 0 ? a : b;
          document.getElementById("label-" + k).textContent = select.options[select.selectedIndex].text;
          document.getElementById("answer-" + k).textContent = text;
        });
        status.dataset.done = "yes";
      });
    });
  }

  function data() {
    const form = document.getElementById("data");
    if (!form) return;
    const out = document.getElementById("data-result");
    document.getElementById("inspect").addEventListener("click", () => {
      out.textContent = "reading ...";
      post("/api/data", { path: document.getElementById("data-path").value, model: document.getElementById("data-model").value,
        example: parseInt(document.getElementById("data-example").value || "0", 10) }).then(({ ok, data }) => {
        out.innerHTML = "";
        if (!ok) { out.textContent = data.detail; return; }
        if (data.problems) {
          const list = document.createElement("ul"); list.id = "problems";
          data.problems.forEach((p) => { const li = document.createElement("li"); li.textContent = p; list.appendChild(li); });
          out.appendChild(list); return;
        }
        const table = document.createElement("table"); table.id = "data-stats";
        Object.entries(data.stats).forEach(([k, v]) => { const row = table.insertRow(); row.insertCell().textContent = k; row.insertCell().textContent = v; });
        out.appendChild(table);
        const caption = document.createElement("p"); caption.textContent = data.source; out.appendChild(caption);
        const pre = document.createElement("pre"); pre.id = "loss-mask";
        data.tokens.forEach((t) => { const span = document.createElement(t.trained ? "mark" : "span"); span.textContent = t.text; pre.appendChild(span); });
        out.appendChild(pre);
      });
    });
  }

  runsTable(); curves(); predictions(); launch(); chat(); data();
})();

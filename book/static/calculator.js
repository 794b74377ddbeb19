// The live memory calculator: vramlab's own Python (vramlab.webcalc, which runs the `vramlab`
// command's code) in the reader's browser through Pyodide. Everything is loaded from this site:
// the Pyodide runtime from its npm package and the vramlab wheel, both under _static/. No formula
// is written here: this file only reads the form, calls Python and draws what it returns.
"use strict";

(function () {
  const root = document.getElementById("vramlab-calc");
  if (!root) return;
  const base = root.dataset.static;  // the _static/ folder, relative to this page
  const status = root.querySelector("#calc-status");
  const form = root.querySelector("#calc-form");
  const out = root.querySelector("#calc-out");
  const raw = root.querySelector("#calc-json");
  const fields = ["model", "batch", "seq", "recipe", "optimizer", "checkpointing", "inference", "lora", "qlora", "gpu", "gpus"];
  const started = performance.now();
  let py = null;

  function query() {
    const q = {};
    form.elements.optimizer.disabled = form.elements.inference.checked;  // a prefill has no optimizer
    for (const name of fields) {
      const el = form.elements[name];
      if (el.disabled) continue;
      if (el.type === "checkbox") { if (el.checked) q[name] = "1"; }
      else if (el.value !== "") q[name] = el.value;
    }
    return q;
  }

  function restore() {
    const params = new URLSearchParams(window.location.search);
    for (const name of fields) {
      const el = form.elements[name];
      if (!params.has(name)) continue;
      if (el.type === "checkbox") el.checked = params.get(name) === "1";
      else el.value = params.get(name);
    }
    if (params.has("config")) form.elements.config.value = params.get("config");
  }

  function permalink(q) {
    const params = new URLSearchParams(q);
    const config = form.elements.config.value.trim();
    if (config) params.set("config", config);
    history.replaceState(null, "", "?" + params.toString());
  }

  function gib(bytes) { return (bytes / 1024 ** 3).toFixed(2) + " GiB"; }

  function bar(breakdown, peak) {
    const rows = Object.entries(breakdown).filter(([, b]) => b > 0);
    return rows.map(([role, b]) =>
      `<div class="calc-bar"><span class="calc-role">${role}</span>` +
      `<span class="calc-fill" style="width:${(100 * b / peak).toFixed(1)}%"></span>` +
      `<span class="calc-bytes">${gib(b)}</span></div>`).join("");
  }

  function show(result) {
    raw.textContent = JSON.stringify(result);
    if (result.error) {
      out.innerHTML = "";
      const p = document.createElement("p");
      p.className = "calc-error";
      p.textContent = result.error;  // the library's own sentence
      out.appendChild(p);
      return;
    }
    const e = result.estimate;
    let html = `<p><b>Peak (steady state): ${gib(e.peak_bytes)}</b>`;
    if (e.first_step_peak_bytes !== undefined && e.first_step_peak_bytes !== null) {
      html += `; first step: ${gib(e.first_step_peak_bytes)}`;
    }
    html += "</p>" + bar(e.breakdown, e.peak_bytes);
    if (e.per_gpu) {
      const s = e.per_gpu.states.pytorch;
      html += `<p>Per GPU over ${e.per_gpu.gpus} GPUs (ZeRO-3 / FSDP): states ${gib(s.parameters + s.gradients + s.optimizer)}` +
        ` + saved activations ${gib(e.per_gpu.activations_bytes)}</p>`;
    }
    if (result.smallest_gpu !== undefined) {
      html += `<p>Smallest GPU that fits (512 MiB spare): ${result.smallest_gpu || "none listed; see the plan below"}</p>`;
    }
    if (result.fit) {
      html += result.fit.error ? `<p class="calc-error">${result.fit.error}</p>` :
        `<p>Largest batch on ${form.elements.gpu.value}: ${result.fit.largest_batch}` +
        (result.fit.plan ? ` (batch 1 needs: ${result.fit.plan.recipe} on ${result.fit.plan.devices} GPUs)` : "") + "</p>";
    }
    out.innerHTML = html;
  }

  function compute() {
    if (!py) return;
    const q = query();
    permalink(q);
    const answer = py.globals.get("answer_json");
    try {
      show(JSON.parse(answer(JSON.stringify(q), form.elements.config.value)));
    } catch (err) {  // not a sentence of the library's: say what broke rather than show stale numbers
      show({ error: "The calculator failed on these inputs: " + err });
    } finally {
      answer.destroy();
    }
  }

  async function start() {
    restore();
    status.textContent = "Loading Python in your browser (Pyodide, from this site)…";
    const here = (path) => new URL(base + path, document.baseURI).href;
    const { loadPyodide } = await import(here("pyodide/pyodide.mjs"));
    py = await loadPyodide({ indexURL: here("pyodide/") });
    const wheel = await (await fetch(base + "wheels/" + root.dataset.wheel)).arrayBuffer();
    py.unpackArchive(wheel, "wheel");
    py.runPython("from vramlab.webcalc import answer_json");
    const seconds = (performance.now() - started) / 1000;
    status.textContent = `Ready: vramlab ${root.dataset.version} running in your browser (loaded in ${seconds.toFixed(1)} s).`;
    root.dataset.loadSeconds = seconds.toFixed(3);
    form.addEventListener("input", compute);
    form.addEventListener("change", compute);
    compute();
    root.dataset.ready = "1";
  }

  start().catch((err) => {
    status.textContent = "The calculator could not start: " + err;
    root.dataset.failed = "1";
  });
})();

// The demo page: runs a MoE layer on WebGPU through the moe-kernels wasm module, checks it
// against the f64 CPU reference in the same module, and sets window.moeResult for tests.
//
//   index.html                                     the GPT-4-style demo layer (16 experts, top-2)
//   index.html?tokens=97&hidden=512&ffn=1376&seed=7&dtype=f32   the demo with other sizes
//                                                  (dtype: expert weights; act=f32|f16|bf16:
//                                                  activations, 16-bit ones as Uint16Array bits)
//   index.html?config=URL&weights=URL&input=URL    any layer (same-origin files, as `moe run` reads)
//   &backend=wgpu|cpu|auto                          which backend (default wgpu; falls back to cpu)
import init, { Backend, Layer, parseInput, toBits16, version } from "./pkg/moe_kernels.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = { backend: null, adapter: null };

function progress(msg) {
  $("status").textContent = msg;
  log(msg);
}

// The browser's own description of its default adapter (wgpu's AdapterInfo has no name on the
// web): vendor, architecture, description, and whether it is a software fallback.
async function browserAdapter() {
  try {
    const a = navigator.gpu && (await navigator.gpu.requestAdapter());
    if (!a) return { text: "no WebGPU adapter", features: "" };
    const i = a.info || {};
    const text = ["WebGPU:", i.vendor, i.architecture, i.device, i.description]
      .filter((s) => s).join(" ") + (i.isFallbackAdapter ? " (fallback adapter)" : "");
    const has = (f) => (a.features.has(f) ? "yes" : "no");
    const features = `shader-f16 ${has("shader-f16")}, subgroups ${has("subgroups")}, ` +
      `timestamp-query ${has("timestamp-query")} (none required)`;
    return { text, features };
  } catch (e) {
    return { text: String(e), features: "" };
  }
}

function log(msg) {
  $("log").textContent += msg + "\n";
  console.log(msg);
}

function rows(table, pairs) {
  $(table).innerHTML = pairs
    .map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`)
    .join("");
}

function finish(result) {
  const el = $("status");
  el.textContent = result.status;
  el.className = result.status;
  $("summary").textContent = result.message || "";
  window.moeResult = result;
  log(`done: ${result.status}${result.message ? " — " + result.message : ""}`);
}

function sameOrigin(name) {
  const raw = params.get(name);
  if (!raw) throw new Error(`missing URL parameter "${name}" (config, weights and input go together)`);
  const url = new URL(raw, location.href);
  if (url.origin !== location.origin) throw new Error(`${name}: ${url} is not on this page's origin`);
  return url;
}

async function fetchOk(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r;
}

function chart(counts) {
  const n = counts.length, max = Math.max(1, ...counts);
  const w = 600, h = 230, pad = 24, bw = (w - 2 * pad) / n;
  let svg = `<svg viewBox="0 0 ${w} ${h}" role="img" aria-label="assignments per expert">`;
  counts.forEach((c, e) => {
    const bh = ((h - 2 * pad) * c) / max, x = pad + e * bw, y = h - pad - bh;
    svg += `<rect x="${x + 2}" y="${y}" width="${Math.max(1, bw - 4)}" height="${bh}"><title>expert ${e}: ${c}</title></rect>`;
    if (n <= 64) {
      svg += `<text x="${x + bw / 2}" y="${h - 8}" text-anchor="middle">${e}</text>`;
      svg += `<text x="${x + bw / 2}" y="${y - 3}" text-anchor="middle">${c}</text>`;
    }
  });
  $("chart").innerHTML = svg + "</svg>";
}

async function main() {
  progress("loading the wasm module…");
  await init();
  log(`moe-kernels ${version()} (wasm32)`);
  const want = params.get("backend") || "wgpu";
  let dev;
  try {
    dev = await Backend.create(want);
  } catch (e) {
    log(`backend ${want} unavailable: ${e.message}; falling back to the CPU`);
    dev = await Backend.create("cpu");
  }
  const browser = await browserAdapter();
  state.backend = dev.kind;
  state.adapter = dev.kind === "wgpu" ? `${browser.text}; wgpu: ${dev.adapter}` : dev.adapter;
  log(`backend ${dev.kind}: ${state.adapter}`);

  let layer, x, tokens, dtype, what;
  if (params.has("config") || params.has("weights") || params.has("input")) {
    progress("fetching the layer…");
    const [cu, wu, iu] = ["config", "weights", "input"].map(sameOrigin);
    const [cfg, w, inp] = await Promise.all([
      fetchOk(cu).then((r) => r.text()),
      fetchOk(wu).then((r) => r.arrayBuffer()),
      fetchOk(iu).then((r) => r.arrayBuffer()),
    ]);
    layer = new Layer(w, cfg);
    ({ x, tokens, dtype } = parseInput(inp));
    what = `${wu.pathname.split("/").pop()} (${JSON.parse(layer.config).preset ?? "custom"})`;
  } else {
    const num = (k, d) => Number(params.get(k) ?? d);
    const hidden = num("hidden", 512), ffn = num("ffn", 1376), seed = num("seed", 7);
    tokens = num("tokens", 97);
    layer = Layer.demo(hidden, ffn, params.get("dtype") || "f32", BigInt(seed));
    x = Layer.demoInput(tokens, hidden, BigInt(seed));
    dtype = params.get("act") || "f32";
    if (dtype !== "f32") x = toBits16(x, dtype);
    what = `GPT-4-style demo layer (seed ${seed})`;
  }
  const cfg = JSON.parse(layer.config);
  rows("info", [
    ["layer", what],
    ["shape", `E = ${layer.experts}, H = ${layer.hidden}, F = ${layer.ffn}, top-${cfg.top_k}` +
      (layer.slots !== cfg.top_k ? ` (${layer.slots} slots)` : "")],
    ["routing", `${cfg.scoring}, ${cfg.activation?.clamped_swiglu ? "clamped_swiglu" : cfg.activation}` +
      (cfg.capacity ? `, capacity ${JSON.stringify(cfg.capacity)}` : "")],
    ["weights", `${layer.weightFormat}, ${(layer.weightBytes / 2 ** 20).toFixed(1)} MiB`],
    ["tokens", `T = ${tokens}, activations ${dtype}`],
    ["backend", `${dev.kind}: ${state.adapter}`],
    ["adapter features", browser.features || "—"],
  ]);

  progress("preparing: uploading weights, compiling pipelines (slow on a software adapter)…");
  let t0 = performance.now();
  const run = await layer.prepare(dev, tokens, dtype);
  log(`prepared on ${run.backend} in ${(performance.now() - t0).toFixed(0)} ms (${(run.weightBytes / 2 ** 20).toFixed(1)} MiB of weights)`);
  progress("running…");
  t0 = performance.now();
  await run.forward(x, tokens); // warm-up: the browser compiles pipelines on first use
  log(`warm-up forward ${(performance.now() - t0).toFixed(0)} ms`);
  const out = await run.forward(x, tokens);
  progress("checking against the f64 CPU reference…");
  const check = layer.check(x, tokens, dtype, out);

  chart(Array.from(out.counts));
  const stages = out.stageTimes;
  const clock = dev.kind === "cpu" ? "host wall time" : stages.length ? "GPU timestamps" : "wall time";
  $("times-title").textContent = `Time per stage (${clock})`;
  const maxMs = Math.max(1e-9, ...stages.map((s) => s.ms));
  $("times").innerHTML =
    stages.map((s) => `<tr><td>${s.stage}</td><td class="num">${s.ms.toFixed(3)} ms</td>` +
      `<td><span class="bar" style="width:${(120 * s.ms) / maxMs}px"></span></td></tr>`).join("") +
    (stages.length ? "" : `<tr><td colspan="3">no timestamp queries on this adapter: per-stage times unavailable</td></tr>`) +
    `<tr><td>layer</td><td class="num">${out.wallMs.toFixed(3)} ms</td><td>host wall time of the forward (one submission)</td></tr>` +
    `<tr><td>reference</td><td class="num">${check.referenceMs.toFixed(1)} ms</td><td>f64 CPU reference in wasm</td></tr>`;
  rows("check", [
    ["y", `rel L2 ${check.relL2.toExponential(3)} (bound ${check.bound.toExponential(0)})`],
    ["top-k sets", check.topkSetsEqual ? "equal" : "differ"],
    ["kept", check.keptEqual ? "equal" : "differ"],
    ["finite", check.finite ? "yes" : "no"],
    ["result", `<b>${check.status}</b>`],
  ]);
  finish({
    status: check.status,
    backend: dev.kind,
    adapter: state.adapter,
    features: Array.from(dev.features),
    tokens: out.tokens,
    hidden: out.hidden,
    slots: out.slots,
    dtype: out.dtype,
    y: Array.from(out.yF32),
    topk_ids: Array.from(out.topkIds),
    topk_weights: Array.from(out.topkWeights),
    kept: Array.from(out.kept),
    counts: Array.from(out.counts),
    rel_l2: check.relL2,
    bound: check.bound,
    stage_times: stages,
    wall_ms: out.wallMs,
    message: `${check.message} (${dev.kind})`,
  });
}

main().catch((e) => {
  console.error(e);
  finish({
    status: "ERROR",
    backend: state.backend,
    adapter: state.adapter,
    y: [], topk_ids: [], topk_weights: [], kept: [],
    message: `${e.name === "MoeError" ? `MoeError (${e.kind})` : e.name || "Error"}: ${e.message ?? e}`,
  });
});

// The private page: the released model (onnx/ beside its weights, served at model/) runs in this
// browser with ONNX Runtime Web (served at ort/ from the npm package the project's setup installs).
// The film is read from the file input into memory and never sent anywhere: the page's only
// requests are for its own files and the model (the server also sends a Content-Security-Policy
// that allows nothing else). What /predict shows that pixels alone can answer is shown here: the
// calibrated probabilities, the call at the stored threshold, the rule checks, the learned input gate
// (a turned or inverted film put right, a picture far from chest films refused), the scope check and
// a heatmap (the head's contribution per patch: forward-only, so no gradients are needed).
import { caution, correctionNotes, gateVerdict, linear, loadGate, refusal } from "./gate.mjs";
import { decide, fitSide, heat, invertGray, overlay, pixelValues, problems, rgbaToGray, softmax,
         turnGray } from "./pixels.mjs";

const $ = (id) => document.getElementById(id);
const state = { ready: false, variant: null, loadMs: null, runs: [] };
window.cxrPrivate = state; // read by tests and benchmarks/private_page.py

function percent(p) { return `${(100 * p).toFixed(1)}%`; }

function table(el, labels, names, probs) {
  el.replaceChildren(...labels.map((k, i) => {
    const tr = document.createElement("tr");
    const a = document.createElement("td"), b = document.createElement("td");
    a.textContent = names[k];
    b.textContent = percent(probs[i]);
    tr.append(a, b);
    return tr;
  }));
}

// A 16-bit PNG is reduced to 8 bits by the browser (its high byte), while the server stretches the
// stored range: the answers would differ, so such a file is sent to the main Space instead.
async function pngBitDepth(file) {
  const head = new Uint8Array(await file.slice(0, 26).arrayBuffer());
  const png = [137, 80, 78, 71, 13, 10, 26, 10].every((v, i) => head[i] === v);
  return png && head.length >= 25 ? head[24] : null;
}

async function decode(file) {
  // imageOrientation "from-image": EXIF rotation applied, as the server's loader does; no colour
  // management, as Pillow does none.
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                                  premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const { data } = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
  return { rgba: data, width: bitmap.width, height: bitmap.height };
}

function clearResult() {
  const result = $("result");
  result.hidden = true;
  for (const key of ["probabilities", "pneumoniaProbability", "label", "decision", "gate"]) delete result.dataset[key];
  $("notes").textContent = "";
  $("verdict").textContent = "";
  $("probs").replaceChildren();
  $("probs-unreliable").replaceChildren();
  $("unreliable").hidden = true;
  $("heat-figure").hidden = true;
  $("timing").textContent = "";
  return result;
}

async function run(cfg, session, gray, width, height) {
  const { height: H, width: W } = cfg.input;
  const input = new ort.Tensor("float32", pixelValues(gray, width, height, cfg.input), [1, 3, H, W]);
  return session.run({ pixel_values: input });
}

// The film at display size, from the grey levels the model saw (after any correction).
function shownGray(gray, width, height, dw, dh) {
  const rgba = new Uint8ClampedArray(width * height * 4);
  for (let i = 0; i < gray.length; i++) {
    rgba[4 * i] = rgba[4 * i + 1] = rgba[4 * i + 2] = gray[i];
    rgba[4 * i + 3] = 255;
  }
  const full = new OffscreenCanvas(width, height);
  full.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
  const small = new OffscreenCanvas(dw, dh).getContext("2d", { willReadFrequently: true });
  small.drawImage(full, 0, 0, dw, dh);
  return rgbaToGray(small.getImageData(0, 0, dw, dh).data, dw, dh);
}

// A film refused by the rules or the learned gate, as the Space says it; the run is counted.
function refuse(result, why) {
  $("verdict").textContent = `This does not look like a frontal chest X-ray: ${why}.`;
  $("verdict").className = "refused";
  result.dataset.decision = "refused";
  delete result.dataset.probabilities;
  $("status").textContent = "Done (nothing was sent).";
  state.runs.push({ refused: true });
  result.dataset.run = String(state.runs.length);
}

async function analyse(cfg, session, gate, file) {
  const t0 = performance.now();
  const result = clearResult();
  if (await pngBitDepth(file) === 16) {
    throw new Error("a 16-bit PNG is reduced to 8 bits differently by a browser than by the server; "
      + "use the main Space for it");
  }
  const decoded = await decode(file);
  const { rgba } = decoded;
  const original = rgbaToGray(rgba, decoded.width, decoded.height);
  let { gray, width, height } = fitSide(original, decoded.width, decoded.height, cfg.max_side);
  const found = problems(gray, width, height, rgba, cfg.rules, decoded.width, decoded.height);
  result.hidden = false;
  if (found.length) return refuse(result, found.join("; "));
  let out = await run(cfg, session, gray, width, height);
  const notes = [];
  if (gate) { // as the Space does: put a turned or inverted film right and predict it again
    const found = gateVerdict(out.features.data, gate);
    let verdict = found;
    if (found.rotation || found.inverted) {
      ({ gray, width, height } = turnGray(gray, width, height, -found.rotation));
      if (found.inverted) gray = invertGray(gray);
      out = await run(cfg, session, gray, width, height);
      verdict = { ...gateVerdict(out.features.data, gate), rotation: found.rotation, inverted: found.inverted,
                  rotationProbability: found.rotationProbability, invertedProbability: found.invertedProbability };
      notes.push(...correctionNotes(verdict));
    }
    result.dataset.gate = JSON.stringify({ rotation: verdict.rotation, inverted: verdict.inverted,
      distance: verdict.distance, out_of_distribution: verdict.outOfDistribution, unusual: verdict.unusual });
    if (verdict.outOfDistribution) return refuse(result, refusal(verdict));
    const note = caution(verdict);
    if (note) notes.push(note);
  }
  $("notes").textContent = notes.length ? `Notes: ${notes.join("; ")}.` : "";
  const t1 = performance.now();
  const probs = softmax(Array.from(out.logits.data));
  const pPneumonia = 1 - probs[cfg.labels.indexOf("normal")];
  const feats = out.features.data;
  const scopeScore = cfg.scope ? linear(cfg.scope.direction, [cfg.scope.offset], feats)[0] : null;
  const outOfScope = cfg.scope !== null && scopeScore > cfg.scope.limit;
  const byLabel = Object.fromEntries(cfg.labels.map((k, i) => [k, probs[i]]));
  result.dataset.probabilities = JSON.stringify(byLabel);
  result.dataset.pneumoniaProbability = String(pPneumonia);
  $("verdict").className = "";
  if (outOfScope) {
    result.dataset.decision = "out_of_scope";
    result.dataset.label = "";
    $("verdict").textContent = `This model is for ${cfg.scope.trained_on}, and this film looks outside that `
      + `(an adult, or a film from another kind of hospital or device; scope score ${scopeScore.toFixed(1)}, `
      + `limit ${cfg.scope.limit.toFixed(1)}). Its answer would not be reliable, so none is given.`;
    table($("probs-unreliable"), cfg.labels, cfg.display_names, probs);
    $("unreliable").hidden = false;
  } else {
    const top = probs.indexOf(Math.max(...probs));
    const label = cfg.labels[top];
    const decision = decide(pPneumonia, cfg.threshold, cfg.uncertain_high);
    result.dataset.label = label;
    result.dataset.decision = decision;
    const words = { no_pneumonia: "No pneumonia detected", uncertain: "Uncertain, refer for review",
                    pneumonia: "Pneumonia suspected, refer" };
    $("verdict").textContent = `${words[decision]}: P(pneumonia) = ${percent(pPneumonia)} `
      + `(triage threshold ${percent(cfg.threshold)}). Most likely: ${cfg.display_names[label]}.`;
    table($("probs"), cfg.labels, cfg.display_names, probs);
    const [, , h, w] = out.patch_contributions.dims;
    const map = heat(out.patch_contributions.data, top, h, w);
    const canvas = $("heatmap");
    const shown = Math.min(1, 512 / Math.max(width, height)); // drawn at display size
    const dw = Math.max(1, Math.round(width * shown)), dh = Math.max(1, Math.round(height * shown));
    canvas.width = dw;
    canvas.height = dh;
    const ctx = canvas.getContext("2d");
    const grayShown = shownGray(gray, width, height, dw, dh);
    ctx.putImageData(new ImageData(overlay(grayShown, dw, dh, map, h, w), dw, dh), 0, 0);
    $("heat-caption").textContent = `What pushed the model towards ${cfg.display_names[label]}: each patch's `
      + "contribution to that class through the classifier head (computed in this browser, no gradients). "
      + "A rougher guide than the Space's Grad-CAM: on validation films it tracks what the model relies on "
      + "far less closely (model card, heatmap faithfulness).";
    $("heat-figure").hidden = false;
  }
  const t2 = performance.now();
  state.runs.push({ probabilitiesMs: t1 - t0, heatmapMs: t2 - t0 });
  result.dataset.run = String(state.runs.length);
  $("timing").textContent = `Answered in ${(t1 - t0).toFixed(0)} ms, heatmap after ${(t2 - t0).toFixed(0)} ms `
    + `(${state.variant} model, in this browser).`;
  $("status").textContent = "Done (nothing was sent).";
}

async function main() {
  const t0 = performance.now();
  const cfg = await (await fetch("model/browser.json")).json();
  const asked = new URLSearchParams(location.search).get("variant");
  const variant = asked && cfg.variants[asked]?.shipped ? asked : cfg.default_variant;
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  // threads need cross-origin isolation (the server sends COOP/COEP for this page)
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const gate = await loadGate(cfg.gate, new URL("model/", location.href));
  const session = await ort.InferenceSession.create(`model/${cfg.variants[variant].file.replace(/^onnx\//, "")}`,
    { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  state.variant = variant;
  state.loadMs = performance.now() - t0;
  state.threads = ort.env.wasm.numThreads;
  state.ready = true;
  $("status").textContent = `Model ready (${variant}, loaded in ${(state.loadMs / 1000).toFixed(1)} s). `
    + "Choose a film: it stays on this device.";
  const input = $("film");
  input.disabled = false;
  input.addEventListener("change", async () => {
    if (!input.files.length) return;
    input.disabled = true; // one film at a time: a result never shows beside another film's name
    $("status").textContent = "Analysing in this browser...";
    try {
      await analyse(cfg, session, gate, input.files[0]);
    } catch (err) {
      clearResult();
      $("status").textContent = `Cannot read this file here: ${err.message || err}.`;
      $("result").dataset.decision = "error";
      state.runs.push({ error: String(err) });
      $("result").dataset.run = String(state.runs.length);
    } finally {
      input.disabled = false;
    }
  });
}

main().catch((err) => {
  $("status").textContent = `The model could not be loaded: ${err.message || err}`;
  state.error = String(err);
});

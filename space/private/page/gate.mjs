// The learned input gate of modeling/gate.py, run in this browser on the graph's `features` output
// (the classifier head's input): is the film turned or inverted (two logistic regressions), and how
// far is it from the training films (Mahalanobis distance, with the caution and refusal limits the
// release fit). Its numbers come from onnx/gate.bin (float32 arrays laid out as browser.json says),
// written by `cxr-export --onnx` from the input_gate.npz the server loads: one source for both.
import { softmax } from "./pixels.mjs";

export async function loadGate(spec, baseUrl) {
  if (!spec) return null;
  return parseGate(spec, await (await fetch(new URL(spec.file, baseUrl))).arrayBuffer());
}

// gate.bin's float32 arrays, named and shaped as browser.json's "gate" says.
export function parseGate(spec, buffer) {
  const all = new Float32Array(buffer);
  const arrays = {};
  let offset = 0;
  for (const [name, shape] of spec.arrays) {
    const n = shape.reduce((a, b) => a * b, 1);
    arrays[name] = all.subarray(offset, offset + n);
    offset += n;
  }
  if (offset !== all.length) throw new Error("the gate's numbers do not match browser.json");
  return { ...spec, ...arrays };
}

// Each output k: bias[k] + weight row k . f (a logistic probe's logits; the scope check's one score).
export function linear(weight, bias, f) {
  const dim = f.length;
  return Array.from(bias, (b, k) => {
    let s = b;
    for (let j = 0; j < dim; j++) s += weight[k * dim + j] * f[j];
    return s;
  });
}

// InputGate.verdicts for one film (JavaScript numbers are float64, as numpy's arithmetic there).
export function gateVerdict(features, gate) {
  const f = Array.from(features);
  const dim = f.length;
  if (dim !== gate.dim) throw new Error(`the gate reads ${gate.dim} features, the model gave ${dim}`);
  const po = softmax(linear(gate.orientation_weight, gate.orientation_bias, f));
  const pp = softmax(linear(gate.polarity_weight, gate.polarity_bias, f));
  const k = po.indexOf(Math.max(...po));
  const d = f.map((v, j) => v - gate.mean[j]);
  let q = 0;
  for (let i = 0; i < dim; i++) {
    let row = 0;
    for (let j = 0; j < dim; j++) row += gate.precision[i * dim + j] * d[j];
    q += d[i] * row;
  }
  const distance = Math.sqrt(Math.max(q, 0));
  return {
    rotation: k && po[k] >= gate.confidence ? gate.rotations[k] : 0,
    rotationProbability: po[k],
    inverted: pp[1] >= gate.confidence,
    invertedProbability: pp[1],
    distance,
    distanceLimit: gate.distance_limit,
    cautionLimit: gate.caution_limit,
    outOfDistribution: distance > gate.distance_limit,
    unusual: distance > gate.caution_limit && distance <= gate.distance_limit,
  };
}

// GateVerdict.notes / caution / refusal, in the server's words.
export function correctionNotes(v) {
  const out = [];
  if (v.rotation) {
    out.push(`the film appeared turned by ${v.rotation} degrees (gate probability ${v.rotationProbability.toFixed(2)}); `
      + "it was turned upright before prediction");
  }
  if (v.inverted) {
    out.push(`the film's grey levels appeared inverted (gate probability ${v.invertedProbability.toFixed(2)}); `
      + "they were inverted back before prediction");
  }
  return out;
}

export function caution(v) {
  return v.unusual ? `the film is unusual for this model (distance ${v.distance.toFixed(1)} to its training films; most `
    + `validation films lie within ${v.cautionLimit.toFixed(1)}): read the result with extra caution` : null;
}

export function refusal(v) {
  return v.outOfDistribution ? `it is far from the chest X-rays the model was trained on (distance `
    + `${v.distance.toFixed(1)}, limit ${v.distanceLimit.toFixed(1)}): a photograph, a screenshot, another body part `
    + "or view, or a very unusual film" : null;
}

// Pixel work of the private page, done exactly as the server does it, so the browser's
// probabilities match /predict's: RGB -> gray as Pillow's convert("L"), the image processor's
// bicubic resize as Pillow's 8-bit resampler (a canvas's resize is unspecified and differs),
// rescale and normalize with the saved processor's numbers, the rule checks of
// modeling/quality.py. Written by hand because no npm package reproduces Pillow's integer
// resampler; tests/test_private_page.py runs this file in Node against Pillow.

const PRECISION_BITS = 32 - 8 - 2; // Pillow's libImaging/Resample.c

// Pillow's L24 (libImaging/Convert.c): ITU-R 601-2 luma in 16.16 fixed point, rounded. A pixel that
// is not opaque is first composited onto black as the server's loader does (Image.paste with the
// alpha as mask: libImaging's BLEND rounding).
export function rgbaToGray(rgba, width, height) {
  const out = new Uint8Array(width * height);
  const onBlack = (c, a) => { const t = c * a + 128; return (t + (t >> 8)) >> 8; };
  for (let i = 0, j = 0; i < out.length; i++, j += 4) {
    let r = rgba[j], g = rgba[j + 1], b = rgba[j + 2];
    const a = rgba[j + 3];
    if (a !== 255) { r = onBlack(r, a); g = onBlack(g, a); b = onBlack(b, a); }
    out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
  }
  return out;
}

function bicubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function box(x) { return x > -0.5 && x <= 0.5 ? 1 : 0; }

function sinc(x) { if (x === 0) return 1; x *= Math.PI; return Math.sin(x) / x; }

function lanczos(x) { return x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0; }

const FILTERS = { bicubic: [bicubic, 2], box: [box, 0.5], lanczos: [lanczos, 3] };

// precompute_coeffs + normalize_coeffs_8bpc of libImaging/Resample.c.
function coefficients(inSize, outSize, filter = "bicubic") {
  const [kernel, filterSupport] = FILTERS[filter];
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filterSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = kernel((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = Math.trunc(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(v) {
  if (v >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / 2 ** PRECISION_BITS);
}

// Pillow's Image.resize(size, filter) of an "L" image: horizontal pass, then vertical.
export function resize(gray, width, height, outW, outH, filter = "bicubic") {
  if (width === outW && height === outH) return Uint8Array.from(gray);
  let src = gray, w = width;
  if (outW !== width) {
    const { bounds, kk, ksize } = coefficients(width, outW, filter);
    const tmp = new Uint8Array(outW * height);
    for (let y = 0; y < height; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
        let ss = 2 ** (PRECISION_BITS - 1);
        for (let x = 0; x < xmax; x++) ss += src[y * w + x + xmin] * kk[xx * ksize + x];
        tmp[y * outW + xx] = clip8(ss);
      }
    }
    src = tmp;
    w = outW;
  }
  if (outH === height) return src;
  const { bounds, kk, ksize } = coefficients(height, outH, filter);
  const out = new Uint8Array(outW * outH);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
    for (let x = 0; x < outW; x++) {
      let ss = 2 ** (PRECISION_BITS - 1);
      for (let y = 0; y < ymax; y++) ss += src[(y + ymin) * w + x] * kk[yy * ksize + y];
      out[yy * outW + x] = clip8(ss);
    }
  }
  return out;
}

export function resizeBicubic(gray, width, height, outW, outH) {
  return resize(gray, width, height, outW, outH, "bicubic");
}

// modeling/image_io.py _fit_side: a film whose long side is over maxSide is reduced to it (box
// filter beyond twice that, else Lanczos), the server's working size. (A JPEG that large is reduced
// by the server's decoder first, libjpeg's DCT scaling, which a browser cannot reproduce: such films
// can differ slightly.)
export function fitSide(gray, width, height, maxSide) {
  if (!maxSide || Math.max(width, height) <= maxSide) return { gray, width, height };
  const scale = maxSide / Math.max(width, height);
  const w = Math.max(1, Math.round(width * scale)), h = Math.max(1, Math.round(height * scale));
  const filter = Math.max(width, height) > 2 * maxSide ? "box" : "lanczos";
  return { gray: resize(gray, width, height, w, h, filter), width: w, height: h };
}

// The gray film as the model's input tensor data (1, 3, H, W): gray replicated to RGB, then the
// processor's rescale and per-channel normalisation (float32, like the processor's output).
export function pixelValues(gray, width, height, input) {
  const { width: W, height: H, rescale_factor: r, image_mean: mean, image_std: std } = input;
  const small = resizeBicubic(gray, width, height, W, H);
  const out = new Float32Array(3 * W * H);
  for (let c = 0; c < 3; c++) {
    const m = Math.fround(mean[c]), s = Math.fround(std[c]), f = Math.fround(r);
    for (let i = 0; i < W * H; i++) out[c * W * H + i] = (Math.fround(small[i] * f) - m) / s;
  }
  return out;
}

// A copy reduced to fit in `side` x `side`, keeping the aspect ratio (for the rule checks).
function thumbnail(gray, width, height, side) {
  const f = Math.max(width / side, height / side, 1);
  const w = Math.max(1, Math.round(width / f)), h = Math.max(1, Math.round(height / f));
  return { data: resizeBicubic(gray, width, height, w, h), width: w, height: h };
}

function std(values) {
  let mean = 0;
  for (const v of values) mean += v;
  mean /= values.length;
  let acc = 0;
  for (const v of values) acc += (v - mean) ** 2;
  return Math.sqrt(acc / values.length);
}

// Hasler and Suesstrunk's colourfulness (modeling/quality.py colourfulness), on a 256 px copy.
export function colourfulness(rgba, width, height) {
  const step = Math.max(1, Math.floor(Math.max(width, height) / 256));
  const rg = [], yb = [];
  for (let y = 0; y < height; y += step) {
    for (let x = 0; x < width; x += step) {
      const j = (y * width + x) * 4;
      rg.push(rgba[j] - rgba[j + 1]);
      yb.push(0.5 * (rgba[j] + rgba[j + 1]) - rgba[j + 2]);
    }
  }
  const mean = (a) => a.reduce((s, v) => s + v, 0) / a.length;
  return Math.hypot(std(rg), std(yb)) + 0.3 * Math.hypot(mean(rg), mean(yb));
}

// The rule checks of modeling/quality.py xray_problems that pixels alone can answer.
export function problems(gray, width, height, rgba, rules, rgbaWidth = width, rgbaHeight = height) {
  const out = [];
  const c = colourfulness(rgba, rgbaWidth, rgbaHeight);
  if (c > rules.max_colourfulness) out.push(`a colour image (colourfulness ${c.toFixed(0)} > ${rules.max_colourfulness}); X-rays are gray`);
  if (Math.min(width, height) < rules.min_side) out.push(`too small (${width}x${height} px; at least ${rules.min_side} px on the shorter side)`);
  const ratio = width / height;
  if (ratio < rules.aspect_range[0] || ratio > rules.aspect_range[1]) out.push(`aspect ratio ${ratio.toFixed(2)} is far from a chest film's`);
  if (std(thumbnail(gray, width, height, 256).data) < rules.min_std) out.push("the image is nearly uniform (no anatomy visible)");
  return out;
}

export function softmax(logits) {
  const m = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

// The triage decision of modeling/predict.py decide(), at the stored threshold.
export function decide(pPneumonia, threshold, uncertainHigh) {
  if (pPneumonia < threshold) return "no_pneumonia";
  if (pPneumonia < uncertainHigh) return "uncertain";
  return "pneumonia";
}

// The head's per-patch contribution map for one class (h x w), as a heat in [0, 1]: the positive
// part (what pushed towards the class), scaled by its maximum, as Grad-CAM's ReLU does.
export function heat(contributions, classIndex, h, w) {
  const off = classIndex * h * w;
  const out = new Float32Array(h * w);
  let max = 0;
  for (let i = 0; i < h * w; i++) {
    out[i] = Math.max(0, contributions[off + i]);
    if (out[i] > max) max = out[i];
  }
  if (max > 0) for (let i = 0; i < out.length; i++) out[i] /= max;
  return out;
}

// Blend a heat map (h x w, bilinear upsampling) over the gray film as RGBA (a "jet"-like ramp).
export function overlay(gray, width, height, heatMap, h, w, alpha = 0.4) {
  const rgba = new Uint8ClampedArray(width * height * 4);
  for (let y = 0; y < height; y++) {
    const fy = Math.min(Math.max((y + 0.5) * h / height - 0.5, 0), h - 1);
    const y0 = Math.floor(fy), y1 = Math.min(y0 + 1, h - 1), dy = fy - y0;
    for (let x = 0; x < width; x++) {
      const fx = Math.min(Math.max((x + 0.5) * w / width - 0.5, 0), w - 1);
      const x0 = Math.floor(fx), x1 = Math.min(x0 + 1, w - 1), dx = fx - x0;
      const v = (heatMap[y0 * w + x0] * (1 - dx) + heatMap[y0 * w + x1] * dx) * (1 - dy)
        + (heatMap[y1 * w + x0] * (1 - dx) + heatMap[y1 * w + x1] * dx) * dy;
      const r = 255 * Math.min(Math.max(1.5 - Math.abs(4 * v - 3), 0), 1);
      const g = 255 * Math.min(Math.max(1.5 - Math.abs(4 * v - 2), 0), 1);
      const b = 255 * Math.min(Math.max(1.5 - Math.abs(4 * v - 1), 0), 1);
      const p = gray[y * width + x], j = (y * width + x) * 4;
      rgba[j] = (1 - alpha) * p + alpha * r;
      rgba[j + 1] = (1 - alpha) * p + alpha * g;
      rgba[j + 2] = (1 - alpha) * p + alpha * b;
      rgba[j + 3] = 255;
    }
  }
  return rgba;
}

// The learned gate's corrections (modeling/gate.py): turn(img, degrees) is Pillow's exact
// rotate(degrees, expand=True), counter-clockwise, for multiples of 90; invert is 255 - v.
export function turnGray(gray, width, height, degrees) {
  const d = ((degrees % 360) + 360) % 360;
  if (d === 0) return { gray, width, height };
  const out = new Uint8Array(width * height);
  if (d === 180) {
    for (let i = 0, n = width * height; i < n; i++) out[i] = gray[n - 1 - i];
    return { gray: out, width, height };
  }
  // 90: new[y'][x'] = old[x'][width-1-y'] (new size height x width); 270: new[y'][x'] = old[height-1-x'][y']
  for (let y = 0; y < width; y++) {
    for (let x = 0; x < height; x++) {
      out[y * height + x] = d === 90 ? gray[x * width + (width - 1 - y)] : gray[(height - 1 - x) * width + y];
    }
  }
  return { gray: out, width: height, height: width };
}

export function invertGray(gray) {
  const out = new Uint8Array(gray.length);
  for (let i = 0; i < gray.length; i++) out[i] = 255 - gray[i];
  return out;
}

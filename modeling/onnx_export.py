"""ONNX export of a released model, for the browser (onnxruntime-web) and the server (onnxruntime).

``cxr-export --model space/model --onnx`` writes, beside the weights, the layout transformers.js and
Xenova's Hub repos use::

    onnx/model.onnx             float32 compute; weights stored as float16 when they are float16-exact,
                                as the released weights are (half the file, the same numbers)
    onnx/model_quantized.onnx   int8 weights (onnxruntime dynamic quantization), ~1/4 of the size
    onnx/browser.json           what the page needs besides the graph: labels, threshold, the image
                                processor's numbers, the rule limits, the scope check, the variants and
                                their agreement, and the layout of gate.bin
    onnx/gate.bin               the learned input gate (input_gate.npz beside the weights) as float32
                                arrays, for the page to run it on the graph's ``features``

The graph takes ``pixel_values`` (the saved image processor's output, any batch size) and returns three
outputs from one forward pass:

* ``logits``: calibrated (the temperature is folded into the head, as in the safetensors weights);
* ``features``: the classification head's input, what the learned input gate and the scope check read;
* ``patch_contributions`` (B, classes, h, w): the head's contribution to each class logit from each
  patch token. DINOv2's head reads ``[CLS, mean(patch tokens)]`` through one linear layer, so class c's
  logit is ``w_c . CLS + (1/N) sum_j w'_c . patch_j + b_c``: the patch term splits exactly into one
  number per patch, a heatmap that needs no gradient (a browser runtime has none) and costs nothing.

A variant ships only if it agrees with the PyTorch float32 model on the films it is checked on
(:data:`TOLERANCES`): float32 max |dp| <= 1e-4; a smaller one <= 0.02 with <= 1% of labels changed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .labels import LABELS

VARIANTS = {"float32": "model.onnx", "int8": "model_quantized.onnx", "float16": "model_fp16.onnx"}
TOLERANCES = {"float32": (1e-4, 0.0), "int8": (0.02, 0.01), "float16": (0.02, 0.01)}
OUTPUTS = ("logits", "features", "patch_contributions")
OPSET = 18


class HeadDecomposition(nn.Module):
    """A DINOv2 classifier as logits + head input + per-patch head contributions (module docstring)."""

    def __init__(self, model) -> None:
        super().__init__()
        if not hasattr(model, "dinov2"):
            raise ValueError(f"the ONNX export with per-patch contributions supports DINOv2 classifiers; got "
                             f"{type(model).__name__}")
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        seq = self.model.dinov2(pixel_values).last_hidden_state
        cls, patches = seq[:, 0], seq[:, 1:]
        features = torch.cat([cls, patches.mean(dim=1)], dim=1)
        head = self.model.classifier
        logits = head(features)
        w_patch = head.weight[:, cls.shape[-1]:]  # (classes, D)
        contrib = patches @ w_patch.t() / patches.shape[1]  # (B, N, classes)
        b, n, k = contrib.shape
        side = int(round(n ** 0.5))
        return logits, features, contrib.permute(0, 2, 1).reshape(b, k, side, side)


def export_graph(model, path: str | Path, image_size: int) -> Path:
    """The float32 graph, batch dimension dynamic (torch.onnx's dynamo exporter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(HeadDecomposition(model.float().eval()).eval(), (example,), dynamo=True,
                                input_names=["pixel_values"], output_names=list(OUTPUTS), opset_version=OPSET,
                                dynamic_shapes={"pixel_values": {0: batch}}, optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    return path


def store_weights_float16(path: Path, min_elements: int = 1024) -> Path:
    """Store the graph's large float32 weights as float16, each followed by a Cast back to float32:
    compute stays float32 and the file halves. The released weights are float16-rounded already
    (:mod:`modeling.export`), so nothing is lost: the graph reproduces the released model exactly.
    Written by hand because onnx's and onnxruntime's float16 converters change the compute precision
    too (that is the separate ``model_fp16.onnx`` variant)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    casts, keep = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            w = numpy_helper.to_array(init)
            if not np.array_equal(w.astype(np.float16).astype(np.float32), w):
                keep.append(init)  # not float16-exact: stays float32 (nothing rounded twice)
                continue
            half = numpy_helper.from_array(w.astype(np.float16), init.name + "__fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "__to_fp32"))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(path))
    return path


def quantize_int8(src: Path, dst: Path) -> Path:
    """int8 weights, activations quantized on the fly (onnxruntime's dynamic quantization: MatMul and
    Gemm weights, which are nearly all of a ViT's bytes)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def to_float16(src: Path, dst: Path) -> Path:
    """float16 weights and compute, inputs and outputs kept float32 (onnxruntime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # ORT's worker threads spin after each run by default; next to torch work (Grad-CAM, the other
    # requests) that steals the cores (it made an interleaved torch benchmark row ~40% slower)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(sess, pv: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {k: [] for k in OUTPUTS}
    for start in range(0, len(pv), batch_size):
        for name, value in zip(OUTPUTS, sess.run(list(OUTPUTS), {"pixel_values": pv[start:start + batch_size]})):
            parts[name].append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


GATE_FILE = "gate.bin"


def gate_arrays(gate) -> list[tuple[str, np.ndarray]]:
    """The learned input gate's numbers in the order ``gate.bin`` stores them (float32, C order)."""
    return [("orientation_weight", gate.orientation.weight), ("orientation_bias", gate.orientation.bias),
            ("polarity_weight", gate.polarity.weight), ("polarity_bias", gate.polarity.bias),
            ("mean", gate.mean), ("precision", gate.precision)]


def write_gate(gate, path: Path) -> dict:
    """``gate.bin`` and its description for ``browser.json`` (the page reads the arrays in this order)."""
    from .gate import ROTATIONS

    arrays = [(name, np.ascontiguousarray(a, dtype=np.float32)) for name, a in gate_arrays(gate)]
    path.write_bytes(b"".join(a.tobytes() for _, a in arrays))
    return {"file": path.name, "dim": int(gate.mean.shape[0]), "arrays": [[n, list(a.shape)] for n, a in arrays],
            "rotations": list(ROTATIONS), "confidence": float(gate.confidence),
            "distance_limit": float(gate.distance_limit), "caution_limit": float(gate.caution_limit)}


def _gate_outcomes(gate, features: np.ndarray) -> list[tuple]:
    return [(v.rotation, v.inverted, v.out_of_distribution, v.unusual) for v in gate.verdicts(features)]


def _as_float32(gate):
    """The gate with the float32 numbers gate.bin holds (what the page computes with)."""
    import dataclasses

    from .probe import LinearHead

    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return dataclasses.replace(gate, orientation=LinearHead(f32(gate.orientation.weight), f32(gate.orientation.bias)),
                               polarity=LinearHead(f32(gate.polarity.weight), f32(gate.polarity.bias)),
                               mean=f32(gate.mean), precision=f32(gate.precision))


def agreement_with_torch(model, processor, images: Sequence, paths: dict[str, Path], threads: int | None = None,
                         scope=None, gate=None) -> dict:
    """Each variant against the PyTorch float32 model on ``images``: max |dp|, label changes, and
    whether it is within :data:`TOLERANCES`. Also checks the exported head decomposition: the patch
    contributions add up to the patch term of the logits (a sanity check of the heatmap's meaning).
    With a scope check, also how many films change scope verdict against the torch float32 features
    (the page computes the verdict from the graph's ``features``); with an input gate, how many films
    change gate outcome (turned, inverted, refused, cautioned) between the server's gate on the torch
    features and the page's float32 numbers (gate.bin) on the graph's."""
    from .calibration import softmax
    from .preprocessing import pixel_values

    pv = torch.cat([pixel_values(processor, list(images[i:i + 32])) for i in range(0, len(images), 32)])
    ref_graph = HeadDecomposition(model).eval()
    with torch.inference_mode():
        ref_out = [ref_graph(pv[i:i + 32]) for i in range(0, len(pv), 32)]
    ref = torch.softmax(torch.cat([o[0] for o in ref_out]), -1).numpy()
    ref_feats = torch.cat([o[1] for o in ref_out]).numpy()
    ref_scope = None if scope is None else [v.out_of_scope for v in scope.verdicts(ref_feats)]
    ref_gate = None if gate is None else _gate_outcomes(gate, ref_feats)
    out = {}
    for variant, path in paths.items():
        got = run_session(session(path, threads), pv.numpy())
        p = softmax(got["logits"])
        diff = float(np.abs(p - ref).max())
        changes = int((p.argmax(1) != ref.argmax(1)).sum())
        max_diff, max_changes = TOLERANCES[variant]
        out[variant] = {"file": f"onnx/{path.name}", "bytes": path.stat().st_size, "n": len(images),
                        "max_abs_probability_diff": diff, "label_changes": changes,
                        "label_change_rate": changes / len(images),
                        "within_tolerance": diff <= max_diff and changes / len(images) <= max_changes,
                        "tolerance": {"max_abs_probability_diff": max_diff, "label_change_rate": max_changes}}
        if ref_scope is not None:
            got_scope = [v.out_of_scope for v in scope.verdicts(got["features"])]
            out[variant]["scope_verdict_changes"] = int(sum(a != b for a, b in zip(ref_scope, got_scope)))
        if ref_gate is not None:  # the server's gate on torch features vs the page's numbers on the graph's
            got_gate = _gate_outcomes(_as_float32(gate), got["features"])
            out[variant]["gate_verdict_changes"] = int(sum(a != b for a, b in zip(ref_gate, got_gate)))
        if variant == "float32":
            head = model.classifier
            d = got["features"].shape[1] // 2
            patch_term = got["features"][:, d:] @ head.weight[:, d:].detach().numpy().T
            out[variant]["patch_contributions_sum_error"] = float(
                np.abs(got["patch_contributions"].sum((2, 3)) - patch_term).max())
    return out


def browser_config(model, processor, agreement: dict, scope=None, gate: dict | None = None) -> dict:
    """What the page needs besides the graph (onnx/browser.json): one place for the threshold, the
    triage band, the processor's numbers, the rule limits and the scope check (its linear score on the
    graph's ``features`` output), so the page computes what ``/predict`` computes from pixels."""
    from .calibration import Calibration
    from .image_io import WORKING_SIDE
    from .labels import DISPLAY_NAMES
    from .decision import default_uncertain_high
    from .quality import ASPECT_RANGE, MAX_COLOURFULNESS, MIN_SIDE, MIN_STD
    from .scope import TRAINED_ON

    cal = Calibration.from_config(model.config)
    size = processor.size
    scope_cfg = None
    if scope is not None:  # score = (w_out - w_in) . features + (b_out - b_in), flagged above the limit
        w, b = scope.head.weight, scope.head.bias
        scope_cfg = {"direction": [float(v) for v in (w[1] - w[0])], "offset": float(b[1] - b[0]),
                     "limit": float(scope.limit), "trained_on": TRAINED_ON}
    return {
        "labels": list(LABELS),
        "display_names": {k: DISPLAY_NAMES[k] for k in LABELS},
        "uncertain_high": float(default_uncertain_high(float(cal.pneumonia_threshold))),
        "max_side": WORKING_SIDE,
        "scope": scope_cfg,
        "gate": gate,  # write_gate's description of gate.bin; None: the model has no input gate
        "pneumonia_labels": [k for k in LABELS if k != "normal"],
        "threshold": float(cal.pneumonia_threshold),
        "temperature_in_weights": bool(cal.temperature_applied),
        "input": {"height": int(size["height"]), "width": int(size["width"]), "resample": "bicubic",
                  "rescale_factor": float(processor.rescale_factor), "image_mean": list(processor.image_mean),
                  "image_std": list(processor.image_std), "grayscale_to_rgb": True},
        "outputs": list(OUTPUTS),
        "rules": {"min_side": MIN_SIDE, "aspect_range": list(ASPECT_RANGE), "min_std": MIN_STD,
                  "max_colourfulness": MAX_COLOURFULNESS},
        "variants": {k: {"file": v["file"], "bytes": v["bytes"], "shipped": v["within_tolerance"]}
                     for k, v in agreement.items()},
        "default_variant": next((k for k in ("int8", "float16", "float32")
                                 if agreement.get(k, {}).get("within_tolerance")), "float32"),
    }


def push_onnx(onnx_dir: str | Path, repo_id: str, *, weights: str | Path, revision: str | None = None) -> str:
    """Upload an export into ``repo_id``'s ``onnx/`` folder in one commit, replacing what was there and
    leaving the model's other files alone: the Hub model repo then serves the layout transformers.js
    and the private page read, next to the weights (``Predictor.from_pretrained(repo, backend="onnx")``
    finds it there). Refused unless the repo's ``model.safetensors`` is ``weights`` (the exported
    model's, by sha256): a graph beside another model's weights, gate and threshold would answer for
    neither. Returns the commit id."""
    from huggingface_hub import HfApi

    from .paths import file_sha256

    api = HfApi()
    here = file_sha256(weights)
    info = api.get_paths_info(repo_id, ["model.safetensors"], repo_type="model", revision=revision)
    there = info[0].lfs.sha256 if info and getattr(info[0], "lfs", None) else None
    if there != here:
        raise ValueError(f"{repo_id} does not hold the exported model's weights (model.safetensors "
                         f"{'missing' if there is None else 'differs'}): upload the model first, then its ONNX export")
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(onnx_dir), path_in_repo="onnx",
                             revision=revision, ignore_patterns=[".*"], delete_patterns=["*"],
                             commit_message="ONNX export for onnxruntime and the private page (cxr-export --onnx)")
    return info.oid


def export_onnx(model_dir: str | Path, *, check_images: Sequence, variants: Sequence[str] = ("float32", "int8"),
                threads: int | None = None, output_dir: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write ``onnx/`` beside the weights of ``model_dir`` (or into ``output_dir``): the variants that
    agree with the PyTorch model on ``check_images``, and ``browser.json``. A smaller variant outside
    its tolerance is not written (the summary says why); a float32 graph outside its tolerance is an
    error and leaves an earlier export as it was. The model's own ``onnx/`` is replaced; another
    non-empty folder only with ``overwrite``, and never the model folder itself. Returns the summary."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .preprocessing import crop_fraction, is_letterbox

    model_dir = Path(model_dir)
    dst = Path(output_dir) if output_dir else model_dir / "onnx"
    if dst.resolve() == model_dir.resolve() or (dst / "config.json").exists():
        raise ValueError(f"{dst} holds a model: write the ONNX export into its own folder (default MODEL/onnx)")
    if dst.exists() and any(dst.iterdir()) and dst.resolve() != (model_dir / "onnx").resolve() and not overwrite:
        raise FileExistsError(f"{dst} is not empty (pass overwrite=True / --overwrite)")
    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    if is_letterbox(processor) or crop_fraction(processor) < 1.0 or "height" not in processor.size:
        # the page reproduces a plain resize to a square (pixels.mjs); a crop or a letterbox would need more
        raise ValueError("the ONNX export serves models whose processor resizes the whole film to a square "
                         "(no centre crop, no letterbox)")
    unknown = set(variants) - set(VARIANTS)
    if unknown or "float32" not in variants:
        raise ValueError(f"variants must include float32 and be among {sorted(VARIANTS)}; got {list(variants)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"float32": export_graph(model, tmp / VARIANTS["float32"], int(processor.size["height"]))}
        if "int8" in variants:  # from the float32 graph, before its weights are stored as float16
            paths["int8"] = quantize_int8(paths["float32"], tmp / VARIANTS["int8"])
        store_weights_float16(paths["float32"])
        if "float16" in variants:
            paths["float16"] = to_float16(paths["float32"], tmp / VARIANTS["float16"])
        from .scope import load_scope

        from .gate import load_gate

        scope = load_scope(str(model_dir))
        gate = load_gate(str(model_dir))
        agreement = agreement_with_torch(model, processor, check_images, paths, threads, scope, gate)
        if not agreement["float32"]["within_tolerance"]:
            raise RuntimeError(f"the float32 graph disagrees with the PyTorch model: {agreement['float32']}")
        staged = tmp / "onnx"
        staged.mkdir()
        for variant, path in paths.items():
            if agreement[variant]["within_tolerance"]:
                shutil.copy2(path, staged / path.name)
        gate_spec = write_gate(gate, staged / GATE_FILE) if gate is not None else None
        config = browser_config(model, processor, agreement, scope, gate_spec)
        (staged / "browser.json").write_text(json.dumps(config, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, dst)
    return {"output_dir": str(dst), "agreement": agreement, "default_variant": config["default_variant"]}

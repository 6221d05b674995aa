"""Validation-only trial behind the decision not to ship an int8 graph: onnxruntime dynamic quantization
(per-tensor, per-channel, per-channel with reduced range) of the released float32 graph against the PyTorch
float32 model on the 689 validation films (tolerance: max |dp| <= 0.02, <= 1% label changes).

    python benchmarks/onnx_int8_trials.py       # writes benchmarks/results/onnx_int8_trials.json
"""
import json
import tempfile
from pathlib import Path
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
from modeling.data import load_cxr_dataset, require_split
from modeling.onnx_export import export_graph, agreement_with_torch
from modeling.scope import load_scope
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
torch.set_num_threads(2)
model = AutoModelForImageClassification.from_pretrained("space/model", dtype=torch.float32).eval()
proc = AutoImageProcessor.from_pretrained("space/model", backend="pil")
images = require_split(load_cxr_dataset("data/cxr-pneumonia"), "validation")["image"]
tmp = Path(tempfile.mkdtemp())
f32 = export_graph(model, tmp / "model.onnx", 224)
pre = tmp / "pre.onnx"
quant_pre_process(str(f32), str(pre), skip_symbolic_shape=True)
trials = {
 "per_tensor": dict(per_channel=False),
 "per_channel": dict(per_channel=True),
 "per_channel_reduce_range": dict(per_channel=True, reduce_range=True),
}
out = {}
for name, kw in trials.items():
    dst = tmp / f"{name}.onnx"
    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], **kw)
    a = agreement_with_torch(model, proc, list(images), {"int8": dst}, 2, load_scope("space/model"))["int8"]
    out[name] = {k: a[k] for k in ("bytes", "max_abs_probability_diff", "label_changes", "within_tolerance", "scope_verdict_changes")}
    print(name, out[name], flush=True)
json.dump(out, open("benchmarks/results/onnx_int8_trials.json", "w"), indent=1)

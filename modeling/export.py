"""Export a trained model for release: half-precision weights, float32 compute.

A DINOv2-small checkpoint is 88 MB in float32; the Space bundles it in the repo, where ~50 MB is the
budget, so the released weights are stored in float16 (44 MB). The config's ``dtype`` is set back to
``float32`` so that a plain ``AutoModelForImageClassification.from_pretrained(dir)`` (transformers 5
loads the config's dtype by default) upcasts on load: CPUs run float16 slowly, and the upcast model
computes in float32 like the one that was validated. :func:`export_model` measures what the
rounding costs on the images you give it (max probability change, changed labels) so the tolerance
is a number, not an assumption.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from .calibration import Calibration
from .metrics import agreement
from .preprocessing import pixel_values

WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_model(src: str | Path, dst: str | Path, *, weights_dtype: str = "float16",
                 check_images: Sequence | None = None, overwrite: bool = False) -> dict:
    """Save ``src`` (a calibrated ``train.py`` output) to ``dst`` with weights in ``weights_dtype``.

    Copies the image processor and, when present, the model card. Refuses an uncalibrated model: a
    release without its temperature and threshold would show uncalibrated probabilities. With
    ``check_images`` (PIL images) the exported model is reloaded and compared with the source.
    Returns a summary dict (sizes, max probability difference, label changes)."""
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(WEIGHT_DTYPES)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} is not empty (pass overwrite=True / --overwrite)")
    model = AutoModelForImageClassification.from_pretrained(src, dtype=torch.float32).eval()
    calibration = Calibration.from_config(model.config)
    if not calibration.temperature_applied:
        raise ValueError(f"{src} is not calibrated (its config has no applied temperature); "
                         "export the output of a finished train.py run, not a checkpoint")
    processor = AutoImageProcessor.from_pretrained(src, backend="pil")
    if dst.exists() and overwrite:
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    copy.deepcopy(model).to(WEIGHT_DTYPES[weights_dtype]).save_pretrained(dst)
    processor.save_pretrained(dst)
    config_path = dst / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"  # compute dtype on load (see module docstring)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src / "README.md").exists():
        shutil.copy2(src / "README.md", dst / "README.md")

    summary = {
        "source": str(src),
        "weights_dtype": weights_dtype,
        "weights_bytes": sum(p.stat().st_size for p in dst.glob("*.safetensors")),
    }
    if check_images:
        reloaded = AutoModelForImageClassification.from_pretrained(dst).eval()
        if reloaded.dtype != torch.float32:
            raise AssertionError(f"exported model loads as {reloaded.dtype}, expected float32")
        ref, new = [], []
        with torch.inference_mode():
            for start in range(0, len(check_images), 32):
                pv = pixel_values(processor, list(check_images[start:start + 32]))
                ref.append(torch.softmax(model(pixel_values=pv).logits, -1).numpy())
                new.append(torch.softmax(reloaded(pixel_values=pv).logits, -1).numpy())
        agree = agreement(np.concatenate(ref), np.concatenate(new))
        summary.update({"checked_images": agree["n"], "max_abs_probability_diff": agree["max_abs_prob_diff"],
                        "label_changes": agree["label_changes"]})
    return summary

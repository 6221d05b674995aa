"""Tiny random-weight base models of each supported family, saved like a Hub checkpoint.

They stand in for `../shared/models/dinov2-small` (saved as a bare ``Dinov2Model``, no head), so the
code under test goes through the same path as with the real base: a headless checkpoint loaded by
``AutoModelForImageClassification`` with our three labels. Each is a few hundred KB and runs in
milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    ConvNextConfig,
    ConvNextV2Config,
    Dinov2Config,
    ViTConfig,
)

FAMILIES = ("vit", "dinov2", "convnext", "convnextv2")


def tiny_config(family: str, image_size: int = 32):
    if family == "vit":
        return ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)
    if family == "dinov2":
        return Dinov2Config(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, mlp_ratio=2)
    if family == "convnext":
        return ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], patch_size=4,
                              image_size=image_size)
    if family == "convnextv2":
        return ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], patch_size=4,
                                image_size=image_size)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def save_tiny_base(family: str, out_dir: Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a headless random-weight base model of ``family`` to ``out_dir`` and return it."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(family, image_size))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def save_tiny_classifier(out_dir: Path, family: str = "dinov2", image_size: int = 32, threshold: float = 0.4,
                         temperature: float = 1.5, seed: int = 0) -> Path:
    """A calibrated 3-class model saved like ``train.py``'s output (weights, config with
    ``cxr_calibration``, image processor): what the Space and the predictor load."""
    from modeling.calibration import Calibration, apply_temperature
    from modeling.models import build_model
    from modeling.preprocessing import PreprocessConfig, build_image_processor

    out_dir = Path(out_dir)
    base = save_tiny_base(family, out_dir.with_name(out_dir.name + "-base"), image_size=image_size, seed=seed)
    model = build_model(str(base))
    apply_temperature(model, temperature)
    Calibration(temperature=temperature, temperature_applied=True, pneumonia_threshold=threshold,
                target_sensitivity=0.985).to_config(model.config)
    model.save_pretrained(out_dir)
    build_image_processor(PreprocessConfig(size=image_size)).save_pretrained(out_dir)
    return out_dir

"""Model building: any ``AutoModelForImageClassification`` base (Hub id or local dir) with our labels.

Supported and tested families: ViT, DINOv2 (with and without registers), ConvNeXt, ConvNeXt-V2.
Other classification backbones load too; only Grad-CAM and layer-wise LR decay need to know the
family (:mod:`modeling.gradcam` raises a clear error for an unknown one).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from .labels import ID2LABEL, LABEL2ID, LABELS

CALIBRATION_KEY = "cxr_calibration"  # modeling.calibration.CONFIG_KEY (that module imports this one)
CONV_FAMILIES = ("convnext", "convnextv2")


def build_model(
    base: str,
    *,
    revision: str | None = None,
    drop_path_rate: float | None = None,
    keep_calibrated_head: bool = False,
    quiet: bool = True,
) -> PreTrainedModel:
    """Load ``base`` as a 3-class classifier (normal, bacterial, viral) ready for training.

    The base may be a headless backbone (e.g. ``facebook/dinov2-small``, saved as ``Dinov2Model``), a
    classifier with another label set (an ImageNet head: replaced), one of our calibrated models
    (head re-initialised and the stored calibration dropped: neither the temperature nor the
    threshold holds for the model training will produce), or an uncalibrated checkpoint of ours
    (kept whole, to continue training). ``keep_calibrated_head`` continues a released model
    instead: its trained head is kept with the temperature divided out (a release's head is the
    trained head scaled by 1/T), so a next release can start where the last one stopped.
    ``drop_path_rate``
    (stochastic depth) is applied when the architecture has it, and refused with a clear error
    otherwise.
    """
    config = AutoConfig.from_pretrained(base, revision=revision)
    if drop_path_rate is not None and not hasattr(config, "drop_path_rate"):
        raise ValueError(f"{config.model_type} has no stochastic depth (drop_path_rate); leave --drop-path-rate unset")
    kwargs = dict(
        num_labels=len(LABELS),
        id2label=dict(ID2LABEL),
        label2id=dict(LABEL2ID),
        problem_type="single_label_classification",
        ignore_mismatched_sizes=True,
    )
    if revision:
        kwargs["revision"] = revision
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    verbosity = hf_logging.get_verbosity()
    if quiet:  # the "newly initialized classifier" report is expected here: it is the point
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForImageClassification.from_pretrained(base, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    calibrated = hasattr(config, CALIBRATION_KEY)
    if calibrated:
        stored = dict(getattr(model.config, CALIBRATION_KEY) or {})
        delattr(model.config, CALIBRATION_KEY)
        if keep_calibrated_head and _has_our_labels(config):
            t = float(stored.get("temperature", 1.0)) if stored.get("temperature_applied") else 1.0
            head = classifier_head(model)
            with torch.no_grad():
                head.weight.mul_(t)
                if head.bias is not None:
                    head.bias.mul_(t)
            return model
    if calibrated or not _has_our_labels(config):
        # A 3-way head of another label order, or ours scaled by 1/T, must not be reused as-is.
        # An uncalibrated checkpoint of ours (train.py's checkpoints/best) keeps its head, so a
        # run can continue from it (e.g. a resolution schedule: 112 px, then 224 px).
        head = classifier_head(model)
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=float(getattr(model.config, "initializer_range", 0.02) or 0.02))
            if head.bias is not None:
                head.bias.zero_()
    return model


def _has_our_labels(config) -> bool:
    id2label = getattr(config, "id2label", None) or {}
    return len(id2label) == len(LABELS) and all(id2label.get(i, id2label.get(str(i))) == name
                                                  for i, name in enumerate(LABELS))


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer that produces the logits (``model.classifier`` for the HF families
    we support; otherwise the last ``nn.Linear`` with ``num_labels`` outputs)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head
    n = getattr(getattr(model, "config", None), "num_labels", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n]
    if not candidates:
        raise ValueError(f"cannot find the classification head of {type(model).__name__}")
    return candidates[-1]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = set(id(p) for p in classifier_head(model).parameters())
    return [p for p in model.parameters() if id(p) not in head]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head (linear-probe warm-up before full fine-tuning)."""
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)


_LAYER_PATTERNS = (
    re.compile(r"\.encoder\.layer\.(\d+)\."),  # ViT, DINOv2, DeiT, BEiT
    re.compile(r"\.encoder\.stages\.(\d+)\."),  # ConvNeXt(V2): stages count as layers
    re.compile(r"^vit\.layers\.(\d+)\."),  # ViT in transformers 5.x (blocks moved out of .encoder)
)


def num_layers(model: PreTrainedModel) -> int:
    cfg = model.config
    if hasattr(cfg, "depths") and cfg.model_type in CONV_FAMILIES:
        return len(cfg.depths)
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)


def layer_id(name: str, n_layers: int) -> int:
    """0 = embeddings, 1..n = transformer blocks (or ConvNeXt stages), n+1 = head and final norms."""
    for pat in _LAYER_PATTERNS:
        m = pat.search(name)
        if m:
            return int(m.group(1)) + 1
    if ".embeddings." in name or name.endswith(("cls_token", "mask_token", "register_tokens", "position_embeddings")):
        return 0
    return n_layers + 1


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, tokens and position embeddings are not weight-decayed (the usual ViT recipe)."""
    return param.ndim <= 1 or any(k in name for k in ("cls_token", "mask_token", "register_tokens", "position_embeddings"))


def param_groups(
    model: PreTrainedModel, lr: float, weight_decay: float, layer_decay: float = 1.0, head_lr_scale: float = 1.0
) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT/DINOv2 fine-tuning recipe):
    block ``i`` of ``n`` gets ``lr * layer_decay ** (n + 1 - i)`` so early, generic layers move less
    than late, task-specific ones. ``layer_decay=1`` is plain fine-tuning. Each group records
    ``lr_scale`` so schedulers keep the ratios."""
    n = num_layers(model)
    head_ids = set(id(p) for p in classifier_head(model).parameters())
    if layer_decay != 1.0 and not any(layer_id(name, n) not in (0, n + 1) for name, _ in model.named_parameters()):
        warnings.warn(f"layer-wise LR decay: no block of {model.config.model_type} matched the known layer names; "
                      "using one learning rate for the backbone (layer_decay=1)")
        layer_decay = 1.0
    groups: dict[tuple[int, bool, bool], dict] = {}
    for name, p in model.named_parameters():
        is_head = id(p) in head_ids
        lid = n + 1 if is_head else layer_id(name, n)
        scale = layer_decay ** (n + 1 - lid) * (head_lr_scale if is_head else 1.0)
        nd = _no_decay(name, p)
        key = (lid, is_head, nd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if nd else weight_decay, "layer_id": lid, "is_head": is_head}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def interpolate_weights(model: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                        alpha: float) -> nn.Module:
    """Load ``(1 - alpha) * start + alpha * end`` into ``model`` (WiSE-FT, Wortsman et al. 2022: the
    pretrained model with its probe head as ``start``, its fine-tuned descendant as ``end``; a
    uniform two-model soup at 0.5). Both state dicts must hold the same float tensors."""
    if set(start) != set(end):
        raise ValueError(f"the two models differ in parameters: {sorted(set(start) ^ set(end))[:5]}")
    mixed = {}
    for k, a in start.items():
        b = end[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        mixed[k] = (1 - alpha) * a.float() + alpha * b.float() if a.is_floating_point() else b
    model.load_state_dict(mixed, strict=True)
    return model


def state_dict_of(path) -> dict[str, torch.Tensor]:
    """Float32 weights under the model's own parameter names, from a ``save_pretrained`` folder (loaded
    through ``from_pretrained``: transformers 5 saves some modules under legacy names) or an Accelerate
    epoch checkpoint of ``train.py`` (``checkpoints/epoch-NNN``: the module's state dict as is)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if (path / "config.json").exists():
        return {k: v.float() for k, v in AutoModelForImageClassification.from_pretrained(path).state_dict().items()}
    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


def average_weights(model: nn.Module, paths) -> nn.Module:
    """``model`` with the uniform average of the checkpoints' weights (a "model soup", Wortsman et al.
    2022: checkpoints of one run share an optimisation basin, so their average is a model too)."""
    sds = [state_dict_of(p) for p in paths]
    avg = {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}
    model.load_state_dict(avg, strict=True)
    return model


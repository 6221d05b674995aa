#!/usr/bin/env python
"""Fine-tune any ``AutoModelForImageClassification`` base (DINOv2, ViT, ConvNeXt...) on the merged
chest X-ray dataset, then calibrate on validation, evaluate once on test, write the model card and
optionally push to the Hub.

    python train.py --dataset data/cxr-pneumonia --base-model ../shared/models/dinov2-small \
        --output-dir outputs/dinov2-s [--epochs 10] [--push-to-hub USER/cxr-pneumonia-dinov2-s]
    accelerate launch train.py ...      # multi-GPU / multi-node: Accelerate does the distribution

Every flag is a field of :class:`TrainConfig`; ``train(TrainConfig(...))`` is the same run from
Python. The loop follows transformers' ``examples/pytorch/image-classification/
run_image_classification_no_trainer.py`` (Accelerate, gradient accumulation, state checkpoints),
with what a medical classifier needs on top: class-imbalance handling, layer-wise LR decay,
epoch checkpoints with ``--resume``, early stopping on validation macro-F1, temperature scaling and a
sensitivity-targeted threshold fit on validation only, one test evaluation at the end.

Output directory::

    config.json, model.safetensors, preprocessor_config.json   calibrated model (save_pretrained)
    README.md             model card (rendered from modeling/model_card_template.md)
    metrics.json          validation (calibrated) and test metrics with bootstrap CIs
    eval_test/            test predictions.csv and plots (confusion matrix, ROC, reliability)
    train_log.jsonl       one line per epoch
    training_config.json  the TrainConfig of the run, plus versions and hardware
    checkpoints/epoch-NNN Accelerate state for --resume (the last --save-total-limit kept)
    checkpoints/best      best epoch by validation macro-F1 (uncalibrated)
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser
from transformers import get_cosine_schedule_with_warmup

from modeling.augment import AugmentConfig, augment
from modeling.calibration import softmax
from modeling.distill import TeacherError, distillation_loss, load_teachers
from modeling.data import groups_of, load_cxr_dataset, require_split, stratified_subset
from modeling.image_io import to_grayscale
from modeling.labels import LABELS
from modeling.models import build_model, param_groups, set_backbone_trainable
from modeling.preprocessing import (IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, build_image_processor,
                                    pixel_values)

logger = logging.getLogger("train")


class TrainError(ValueError):
    """A run that cannot start or continue as configured (a wrong setting, an earlier run's directory,
    a resume with other settings, validation without both classes...). ``python train.py`` prints
    the message and exits with status 2; Python callers can catch it like any ValueError."""


@dataclass
class TrainConfig:
    dataset: str = field(metadata={"help": "dataset directory from dataset_scripts.build, or a Hub dataset id"})
    base_model: str = field(metadata={"help": "Hub id or directory of any AutoModelForImageClassification base"})
    output_dir: str = field(metadata={"help": "where the model, card, metrics and checkpoints go"})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision"})
    base_model_revision: str | None = field(default=None, metadata={"help": "Hub model revision"})
    keep_calibrated_head: bool = field(default=False, metadata={"help": "continue one of our calibrated (released) "
                                       "models with its trained head, the temperature divided out; default: a fresh head"})
    # data
    image_size: int = field(default=224, metadata={"help": "square input side (multiple of the patch size for ViTs)"})
    letterbox: bool = field(default=False, metadata={"help": "keep aspect ratio, pad with black (else stretch)"})
    crop_pct: float = field(default=1.0, metadata={"help": "centre crop keeping this fraction of the side, in the "
                            "saved processor (so at evaluation and after augmentation in training); 1 = none"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use N training images (stratified by class, seeded)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use N validation and test images (smoke runs; not a result)"})
    crop_scale_min: float = field(default=0.8, metadata={"help": "smallest crop area fraction (1 = no crop)"})
    crop_ratio_min: float = field(default=0.9, metadata={"help": "smallest crop aspect change (width/height relative "
                                  "to the image's own; the anchor recipe's RandomResizedCrop uses 0.75)"})
    crop_ratio_max: float = field(default=1.1, metadata={"help": "largest crop aspect change (anchor: 4/3)"})
    zoom_out: float = field(default=1.0, metadata={"help": "shrink the film by up to this factor onto a black "
                            "frame (a smaller chest on the detector); 1 = off"})
    zoom_out_p: float = field(default=0.0, metadata={"help": "probability of the zoom out"})
    max_rotation: float = field(default=7.0, metadata={"help": "rotation range in degrees"})
    brightness: float = field(default=0.15, metadata={"help": "brightness jitter (fraction)"})
    contrast: float = field(default=0.15, metadata={"help": "contrast jitter (fraction)"})
    gamma: float = field(default=0.15, metadata={"help": "gamma jitter (fraction, log-uniform)"})
    gamma_min: float = field(default=0.0, metadata={"help": "with --gamma-max: sample gamma log-uniformly in "
                             "[gamma_min, gamma_max] instead of the --gamma jitter (0 = use --gamma)"})
    gamma_max: float = field(default=0.0)
    tone_p: float = field(default=1.0, metadata={"help": "probability of each tone change (brightness, contrast, gamma)"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flips (off: mirrored chests are not real films)"})
    noise: float = field(default=0.0, metadata={"help": "Gaussian noise up to this sigma (grey levels); 0 = off"})
    noise_p: float = field(default=0.5, metadata={"help": "probability of the noise"})
    blur: float = field(default=0.0, metadata={"help": "Gaussian blur up to this radius (px); 0 = off"})
    blur_p: float = field(default=0.5, metadata={"help": "probability of the blur"})
    sharpen: float = field(default=0.0, metadata={"help": "unsharp mask up to this percent; 0 = off"})
    sharpen_p: float = field(default=0.5, metadata={"help": "probability of the unsharp mask"})
    jpeg_quality_min: int = field(default=0, metadata={"help": "JPEG re-encoding at a quality drawn from this to 95; 0 = off"})
    jpeg_p: float = field(default=0.5, metadata={"help": "probability of the JPEG re-encoding"})
    # loss
    loss: str = field(default="weighted_ce", metadata={"choices": ["ce", "weighted_ce", "focal"],
                      "help": "class imbalance: inverse-frequency weighted CE (default), focal loss, or plain CE"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    label_smoothing: float = field(default=0.0)
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp Beta(alpha, alpha); 0 = off"})
    teachers: list[str] = field(default_factory=list, metadata={
        "nargs": "+", "help": "our (calibrated) models, directories or Hub ids, whose probabilities averaged on the "
        "same augmented view the student also learns (knowledge distillation, modeling/distill.py)"})
    distill_alpha: float = field(default=0.5, metadata={"help": "with --teachers: loss = (1 - a) x the hard-label "
                                 "loss + a x the distillation loss"})
    distill_temperature: float = field(default=2.0, metadata={"help": "with --teachers: the softmax temperature "
                                       "tau of teachers and student in the distillation loss (Hinton et al.)"})
    # optimisation
    epochs: int = field(default=10)
    batch_size: int = field(default=32, metadata={"help": "per device"})
    eval_batch_size: int = field(default=64)
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=5e-5, metadata={"help": "peak LR after warmup of the layers above the last block (final norm); block i of n gets lr * layer_decay**(n+1-i), the head lr * head_lr_scale"})
    weight_decay: float = field(default=0.05)
    layer_decay: float = field(default=0.75, metadata={"help": "layer-wise LR decay (1 = off)"})
    head_lr_scale: float = field(default=10.0, metadata={"help": "head LR multiplier (new layer learns faster)"})
    warmup_ratio: float = field(default=0.1)
    max_grad_norm: float = field(default=1.0)
    drop_path_rate: float | None = field(default=None, metadata={"help": "stochastic depth, for architectures that have it (DINOv2, ConvNeXt, BEiT...; not HF's ViT)"})
    freeze_backbone_epochs: int = field(default=0, metadata={"help": "train only the head for the first N epochs"})
    ema_decay: float = field(default=0.0, metadata={"help": "exponential moving average of the weights after each "
                             "update (e.g. 0.995); validation, selection and the saved model then use the averaged "
                             "weights; 0 = off"})
    mixed_precision: str = field(default="auto", metadata={"choices": ["auto", "no", "bf16", "fp16"],
                                 "help": "auto = bf16 on CPU and on GPUs that support it"})
    seed: int = field(default=42)
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: 0 on CPU, where they would compete with the model for cores; up to 8 with a GPU)"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    # selection, calibration, evaluation
    early_stopping_patience: int = field(default=3, metadata={"help": "epochs without a gain in --selection-metric; 0 = off"})
    selection_metric: str = field(default="macro_f1", metadata={
        "choices": ["macro_f1", "nll", "robust_worst_macro_f1"],
        "help": "what picks the best epoch and drives early stopping: validation macro-F1, validation NLL (lower is "
                "better; the anchor recipe's validation loss), or the worst-case macro-F1 under the robustness battery "
                "(needs --robustness)"})
    robustness: bool = field(default=False, metadata={"help": "score every epoch on validation under the robustness "
                             "battery (modeling/robustness.py, bf16; about +35%% time at 224 px) and log the summary"})
    target_sensitivity: float = field(default=0.985, metadata={"help": "pneumonia sensitivity the threshold is set for on validation"})
    n_bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for CIs"})
    no_test: bool = field(default=False, metadata={"help": "skip the final test evaluation"})
    # checkpoints, output
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in output_dir"})
    resume_from: str | None = field(default=None, metadata={"help": "resume from this checkpoint directory"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "delete an earlier run's checkpoints and log in output_dir"})
    save_total_limit: int = field(default=2, metadata={"help": "epoch checkpoints to keep"})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the model to"})
    hub_private: bool = field(default=False)
    no_progress: bool = field(default=False)

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(crop_scale=(self.crop_scale_min, 1.0), crop_ratio=(self.crop_ratio_min, self.crop_ratio_max),
                             zoom_out=self.zoom_out, zoom_out_p=self.zoom_out_p,
                             max_rotation=self.max_rotation, brightness=self.brightness, contrast=self.contrast,
                             gamma=self.gamma, gamma_range=(self.gamma_min, self.gamma_max) if self.gamma_min > 0 and self.gamma_max > 0 else None,
                             tone_p=self.tone_p, hflip=self.hflip, noise=self.noise, noise_p=self.noise_p,
                             blur=self.blur, blur_p=self.blur_p, sharpen=self.sharpen, sharpen_p=self.sharpen_p,
                             jpeg_quality=self.jpeg_quality_min, jpeg_p=self.jpeg_p)


class XrayDataset(Dataset):
    """A ``datasets`` split as (pixel_values, label); training items are augmented with an RNG seeded
    by (seed, epoch, index) so a resumed run sees the same images as an uninterrupted one."""

    def __init__(self, split, processor, aug: AugmentConfig | None, seed: int) -> None:
        self.split, self.processor, self.aug, self.seed = split, processor, aug, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        row = self.split[int(i)]
        img = to_grayscale(row["image"])
        if self.aug is not None:
            img = augment(img, self.aug, random.Random(hash((self.seed, self.epoch, int(i)))))
        return pixel_values(self.processor, [img])[0], int(row["label"])


def collate(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)


def class_weights(labels: list[int]) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (n / (k * count)); absent classes get 0."""
    counts = np.bincount(labels, minlength=len(LABELS)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (len(LABELS) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-batch loss. ``target`` is class indices or (MixUp) a soft (B, C) distribution."""
    logits = logits.float()
    if target.ndim == 1:
        target = F.one_hot(target, len(LABELS)).float()
    if cfg.label_smoothing > 0:
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / len(LABELS)
    logp = F.log_softmax(logits, dim=-1)
    per_class = -target * logp
    if cfg.loss == "focal":  # Lin et al. 2017: down-weights easy examples
        per_class = per_class * (1 - logp.exp()) ** cfg.focal_gamma
    if weights is not None:
        per_class = per_class * weights.to(logits.device)
        # weighted mean as in F.cross_entropy(weight=...): normalise by the targets' total weight
        return per_class.sum() / (target * weights.to(logits.device)).sum().clamp_min(1e-12)
    return per_class.sum(dim=-1).mean()


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"  # CPU autocast in bf16: 1.2-2x faster on recent x86 (measured on our machines)


def base_normalisation(base: str, revision: str | None) -> tuple[tuple, tuple]:
    """The base model's own mean/std (its processor), ImageNet's when it has none."""
    try:
        proc = AutoImageProcessor.from_pretrained(base, revision=revision)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        return IMAGENET_MEAN, IMAGENET_STD


def check_input_size(model, size: int) -> None:
    """ViT/DeiT/BEiT position embeddings are fixed to the checkpoint's image size (the pipeline does
    not interpolate them), so a different size must be refused rather than silently degraded."""
    cfg = model.config
    if cfg.model_type in ("vit", "deit", "beit") and int(cfg.image_size) != size:
        raise TrainError(f"{cfg.model_type} base was trained at {cfg.image_size} px; use --image-size {cfg.image_size}")
    patch = getattr(cfg, "patch_size", None)
    if cfg.model_type.startswith("dinov2") and patch and size % patch:
        raise TrainError(f"--image-size {size} is not a multiple of the patch size {patch}")


def check_validation(val_split) -> None:
    """Selection, temperature and threshold need normal and pneumonia cases in validation; fail at
    the start, not after hours of training."""
    counts = np.bincount(np.asarray(val_split["label"]), minlength=len(LABELS))
    if counts[0] == 0 or counts[1:].sum() == 0:
        raise TrainError(f"validation needs normal and pneumonia images to calibrate; has {dict(zip(LABELS, counts.tolist()))}")


# Fields that may differ between a run and its resumption: they do not change how an epoch is
# trained (patience only changes when training stops; the others where things go or what is
# reported after training).
RESUME_MAY_CHANGE = {"output_dir", "resume", "resume_from", "overwrite_output_dir", "no_progress", "num_workers",
                     "num_threads", "push_to_hub", "hub_private", "n_bootstrap", "no_test", "early_stopping_patience",
                     "eval_batch_size", "target_sensitivity"}
# What an earlier run leaves in output_dir (all of it is removed by --overwrite-output-dir).
RUN_FILES = ("checkpoints", "train_log.jsonl", "metrics.json", "model.safetensors", "eval_test", "config.json",
             "preprocessor_config.json", "README.md", "training_config.json")


def prepare_output_dir(cfg: "TrainConfig", out: Path) -> None:
    """Refuse to mix a new run into an earlier run's directory (its checkpoints would be rotated
    together and a later --resume would pick up the wrong state)."""
    if cfg.resume or cfg.resume_from:
        if cfg.overwrite_output_dir:
            raise TrainError("--overwrite-output-dir and --resume/--resume-from contradict each other")
        return
    earlier = [out / name for name in RUN_FILES[:5] if (out / name).exists()]
    if not earlier:
        return
    if not cfg.overwrite_output_dir:
        raise TrainError(f"{out} holds an earlier run ({', '.join(p.name for p in earlier)}); "
                         "use --resume to continue it or --overwrite-output-dir to start over")
    for p in (out / name for name in RUN_FILES):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _same_setting(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, list) and isinstance(b, list):  # --teachers: the same folders written another way
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()  # the same local dataset/base written another way
    return False


def check_resume_config(cfg: "TrainConfig", saved: dict) -> None:
    """Refuse to resume with other training settings. A field the checkpoint predates counts as its
    default then (the run was trained without it): resuming an older run with, say, ``--teachers``
    would change training mid-run."""
    import dataclasses

    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(TrainConfig)}
    saved = {**{k: v for k, v in defaults.items() if v is not dataclasses.MISSING}, **saved}
    diff = {k: (saved[k], v) for k, v in asdict(cfg).items()
            if k not in RESUME_MAY_CHANGE and k in saved and not _same_setting(saved[k], v)}
    if diff:
        raise TrainError("--resume with other training settings than the checkpoint's: "
                         + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items())))


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("epoch-*"))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


@torch.no_grad()
def predict(accelerator: Accelerator, model, loader, desc: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits in float32, without autocast: selection and calibration must see the numbers
    the saved (float32) model will produce, not bf16 approximations of them."""
    model.eval()
    inner = accelerator.unwrap_model(model)
    # accelerator.prepare wraps forward in autocast under mixed precision and keeps the original
    # as `_original_forward`; use that one here.
    forward = getattr(inner, "_original_forward", inner.forward)
    all_logits, all_labels = [], []
    for pv, y in tqdm(loader, desc=desc, disable=not progress or not accelerator.is_local_main_process, leave=False):
        logits = forward(pixel_values=pv).logits
        logits, y = accelerator.gather_for_metrics((logits.float(), y))
        all_logits.append(logits.cpu().numpy())
        all_labels.append(y.cpu().numpy())
    return np.concatenate(all_logits), np.concatenate(all_labels)


def quick_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Per-epoch validation summary used for selection (no bootstrap: it runs every epoch)."""
    from modeling.metrics import compute_metrics

    m = compute_metrics(softmax(logits.astype(np.float64)), labels, None, threshold=0.5, n_bootstrap=0)
    return {"n": int(len(labels)), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "nll": m["nll"], "ece": m["ece"],
            "auc_ovr_macro": m["auc_ovr_macro"], "binary_auc": m["binary"]["auc"]}


def robustness_summary(model, processor, val_split) -> dict:
    """The robustness battery's summary for the current weights (every process computes it: it is
    deterministic, so all ranks reach the same selection decision)."""
    from modeling import robustness as rb

    was_training = model.training
    logits = rb.battery_logits(rb.model_logits_fn(model, processor, "bfloat16"), (r["image"] for r in val_split))
    model.train(was_training)
    return rb.score(logits, np.asarray(val_split["label"]))["summary"]


def selection_value(metric: str, val: dict, robust: dict | None) -> float:
    """Higher is better: macro-F1, -NLL, or the battery's worst-case macro-F1."""
    if metric == "macro_f1":
        return float(val["macro_f1"])
    if metric == "nll":
        return -float(val["nll"])
    if metric == "robust_worst_macro_f1" and robust is not None:
        return float(robust["worst_macro_f1"])
    raise ValueError(f"--selection-metric {metric!r} cannot be computed (robust_worst_macro_f1 needs --robustness)")


@dataclass
class Run:
    """Everything one training run holds between epochs (built by :func:`prepare_run`)."""

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    precision: str
    pcfg: PreprocessConfig
    processor: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_ds: XrayDataset
    train_dl: Any
    val_dl: Any
    val_split: Any
    test_split: Any
    test_subset: bool
    n_train: int
    weights: torch.Tensor | None
    ema: Any = None
    teachers: Any = None

    @property
    def progress(self) -> bool:
        return not self.cfg.no_progress

    def evaluated_model(self):
        """What is validated, selected and saved: the EMA weights when there are any."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)


def check_config(cfg: TrainConfig) -> None:
    if cfg.selection_metric not in ("macro_f1", "nll", "robust_worst_macro_f1"):
        raise TrainError(f"unknown --selection-metric {cfg.selection_metric!r}")
    if cfg.selection_metric == "robust_worst_macro_f1" and not cfg.robustness:
        raise TrainError("--selection-metric robust_worst_macro_f1 needs --robustness (the battery is what it reads)")


def prepare_run(cfg: TrainConfig) -> Run:
    """Data, preprocessing, model, optimiser, scheduler, EMA, wrapped by Accelerate."""
    check_config(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    precision = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # Under DDP: some backbones own parameters a classification forward never uses (DINOv2's
        # mask_token), and --freeze-backbone-epochs switches gradients off after wrapping.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    set_seed(cfg.seed)

    ds = load_cxr_dataset(cfg.dataset, revision=cfg.dataset_revision)
    train_split = stratified_subset(require_split(ds, "train"), cfg.max_train_samples, cfg.seed)
    val_split = stratified_subset(require_split(ds, "validation"), cfg.max_eval_samples, cfg.seed)
    test_split = None if cfg.no_test or "test" not in ds else stratified_subset(ds["test"], cfg.max_eval_samples, cfg.seed)
    test_subset = test_split is not None and len(test_split) < len(ds["test"])
    check_validation(val_split)
    mean, std = base_normalisation(cfg.base_model, cfg.base_model_revision)
    pcfg = PreprocessConfig(size=cfg.image_size, letterbox=cfg.letterbox, image_mean=mean, image_std=std,
                            crop_pct=cfg.crop_pct)
    processor = build_image_processor(pcfg)

    model = build_model(cfg.base_model, revision=cfg.base_model_revision, drop_path_rate=cfg.drop_path_rate,
                        keep_calibrated_head=cfg.keep_calibrated_head)
    check_input_size(model, cfg.image_size)
    teachers = None
    if cfg.teachers:
        if not 0.0 <= cfg.distill_alpha <= 1.0:
            raise TrainError(f"--distill-alpha must be in [0, 1], got {cfg.distill_alpha}")
        try:
            teachers = load_teachers(cfg.teachers, processor, cfg.distill_temperature)
        except TeacherError as e:
            raise TrainError(str(e)) from None

    workers = cfg.num_workers if cfg.num_workers is not None else (
        min(8, max(1, (os.cpu_count() or 1) // accelerator.num_processes)) if accelerator.device.type != "cpu" else 0)
    train_ds = XrayDataset(train_split, processor, cfg.augment_config(), cfg.seed)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                          num_workers=workers, drop_last=len(train_ds) > cfg.batch_size)
    val_dl = DataLoader(XrayDataset(val_split, processor, None, cfg.seed), batch_size=cfg.eval_batch_size,
                        collate_fn=collate, num_workers=workers)
    weights = class_weights(list(train_split["label"])) if cfg.loss in ("weighted_ce", "focal") else None

    optimizer = torch.optim.AdamW(param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.layer_decay,
                                               cfg.head_lr_scale), lr=cfg.learning_rate)
    ema = None
    if cfg.ema_decay > 0:  # built from the plain model, before Accelerate wraps its forward
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)  # saved and restored with every epoch state
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    updates_per_epoch = math.ceil(len(train_dl) / cfg.gradient_accumulation_steps)
    total_updates = updates_per_epoch * cfg.epochs
    # Accelerate steps a prepared scheduler once per process per update (see the HF example).
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_updates) * accelerator.num_processes,
        num_training_steps=total_updates * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    if teachers is not None:
        teachers.to(accelerator.device)
    return Run(cfg=cfg, out=Path(cfg.output_dir), accelerator=accelerator, precision=precision, pcfg=pcfg,
               processor=processor, model=model, optimizer=optimizer, scheduler=scheduler, train_ds=train_ds,
               train_dl=train_dl, val_dl=val_dl, val_split=val_split, test_split=test_split, test_subset=test_subset,
               n_train=len(train_split), weights=weights, ema=ema, teachers=teachers)


def restore(run: Run) -> tuple[dict, dict | None]:
    """The training state to continue from: fresh, or the checkpoint ``--resume``/``--resume-from``
    names (its settings checked, the log trimmed to it). The second value is the final metrics when
    the run had already finished (nothing left to do)."""
    cfg, out, accelerator = run.cfg, run.out, run.accelerator
    if accelerator.is_main_process:
        prepare_output_dir(cfg, out)
    accelerator.wait_for_everyone()
    state = {"epoch": 0, "global_step": 0, "best_metric": None, "best_epoch": None, "bad_epochs": 0,
             "finished": False, "config": asdict(cfg)}
    resume_path = Path(cfg.resume_from) if cfg.resume_from else (latest_checkpoint(out) if cfg.resume else None)
    if cfg.resume and resume_path is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out / "checkpoints")
    if resume_path is not None:
        saved = json.loads((resume_path / "trainer_state.json").read_text())
        if "config" in saved:
            check_resume_config(cfg, saved["config"])
        else:
            logger.warning("%s records no training settings; cannot check they match", resume_path)
        finished = [c for c in sorted((resume_path.parent).glob("epoch-*"))
                    if json.loads(((c / "trainer_state.json").read_text()) if (c / "trainer_state.json").exists()
                                  else "{}").get("finished")]
        if saved.get("finished") or finished:
            logger.warning("%s: this run already finished (calibrated, evaluated); nothing to resume. Start a new "
                           "run in another directory to train again.", resume_path)
            done = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
            if cfg.push_to_hub and accelerator.is_main_process and (out / "model.safetensors").exists():
                done["hub_commit"] = push(out, cfg.push_to_hub, private=cfg.hub_private)
            return state, done
        accelerator.load_state(str(resume_path))
        state = {**saved, "config": asdict(cfg)}
        logger.info("resumed from %s (epoch %d done)", resume_path, state["epoch"])
        if accelerator.is_main_process and (out / "train_log.jsonl").exists():  # drop epochs after the checkpoint
            kept = [ln for ln in (out / "train_log.jsonl").read_text().splitlines()
                    if ln.strip() and json.loads(ln)["epoch"] <= state["epoch"]]
            (out / "train_log.jsonl").write_text("".join(ln + "\n" for ln in kept))

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        info_path = out / "training_config.json"
        info = run_info(cfg, run.precision, accelerator, run.pcfg, run.n_train, len(run.val_split))
        if resume_path is not None and info_path.exists():  # keep the original command; list the resumes
            first = json.loads(info_path.read_text())
            first.setdefault("resumed", []).append({"command": info["command"], "from": str(resume_path)})
            info = first
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    return state, None


def train_epoch(run: Run, epoch: int, state: dict) -> dict:
    """One pass over the training data; returns the epoch's loss, throughput and whether the backbone
    was frozen."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    frozen = epoch <= cfg.freeze_backbone_epochs
    set_backbone_trainable(accelerator.unwrap_model(model), not frozen)
    run.train_ds.epoch = epoch
    run.train_dl.set_epoch(epoch)
    model.train()
    t0, seen, loss_sum, n_batches, distill_sum = time.perf_counter(), 0, 0.0, 0, 0.0
    bar = tqdm(run.train_dl, desc=f"epoch {epoch}/{cfg.epochs}",
               disable=not run.progress or not accelerator.is_local_main_process)
    for pv, y in bar:
        with accelerator.accumulate(model):
            target = y
            if cfg.mixup_alpha > 0:
                lam = float(np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                perm = torch.randperm(pv.shape[0], device=pv.device)
                pv = lam * pv + (1 - lam) * pv[perm]
                onehot = F.one_hot(y, len(LABELS)).float()
                target = lam * onehot + (1 - lam) * onehot[perm]
            with accelerator.autocast():
                logits = model(pixel_values=pv).logits
                taught = run.teachers.probs(pv) if run.teachers is not None else None
            loss = loss_fn(logits, target, cfg, run.weights)
            if taught is not None:
                distill = distillation_loss(logits, taught, cfg.distill_temperature)
                distill_sum += distill.item()
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * distill
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            state["global_step"] += 1
            if run.ema is not None:
                run.ema.update_parameters(accelerator.unwrap_model(model))
        seen += pv.shape[0] * accelerator.num_processes
        loss_sum += loss.item()
        n_batches += 1
        bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
    seconds = time.perf_counter() - t0
    record = {"train_loss": loss_sum / max(n_batches, 1), "backbone_frozen": frozen,
              "train_images_per_second": round(seen / seconds, 3), "train_seconds": round(seconds, 1)}
    if run.teachers is not None:
        record["distill_loss"] = distill_sum / max(n_batches, 1)
    return record


def validate_epoch(run: Run, epoch: int, state: dict) -> tuple[dict, bool]:
    """Validation metrics (and the robustness battery with ``--robustness``); updates the best epoch
    and the early-stopping count. Returns the log fields and whether this epoch is the new best."""
    t1 = time.perf_counter()
    val_logits, val_labels = predict(run.accelerator, run.ema.module if run.ema is not None else run.model, run.val_dl,
                                     "validation", run.progress)
    val_seconds = time.perf_counter() - t1
    val = quick_metrics(val_logits, val_labels)
    robust = robustness_summary(run.evaluated_model(), run.processor, run.val_split) if run.cfg.robustness else None
    value = selection_value(run.cfg.selection_metric, val, robust)
    improved = state["best_metric"] is None or value > state["best_metric"] + 1e-6
    if improved:
        state.update(best_metric=value, best_val_macro_f1=val["macro_f1"], best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    fields = {"eval_images_per_second": round(len(val_labels) / val_seconds, 3), "val": val}
    if robust is not None:
        fields["robustness"] = robust
    return fields, improved


def save_epoch(run: Run, epoch: int, state: dict, record: dict, improved: bool) -> None:
    """The Accelerate state for --resume, the best model so far, the log line, old checkpoints rotated."""
    cfg, out, accelerator = run.cfg, run.out, run.accelerator
    accelerator.wait_for_everyone()
    ckpt = out / "checkpoints" / f"epoch-{epoch:03d}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        if improved:  # after save_state: best/ never runs ahead of a resumable checkpoint
            best = out / "checkpoints" / "best"
            run.evaluated_model().save_pretrained(best)
            run.processor.save_pretrained(best)
            (best / "best_epoch.json").write_text(json.dumps({"epoch": epoch}) + "\n")
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        robust = record.get("robustness")
        logger.info("epoch %d: loss %.4f val macro-F1 %.4f acc %.4f nll %.4f%s (best epoch %s) %.2f img/s",
                    epoch, record["train_loss"], record["val"]["macro_f1"], record["val"]["accuracy"],
                    record["val"]["nll"],
                    "" if robust is None else f" robustness worst macro-F1 {robust['worst_macro_f1']:.4f}",
                    state["best_epoch"], record["train_images_per_second"])
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        old = sorted((out / "checkpoints").glob("epoch-*"))[:-cfg.save_total_limit] if cfg.save_total_limit else []
        for c in old:
            shutil.rmtree(c, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(cfg: TrainConfig) -> dict:
    """Run the whole recipe; returns the final metrics dict (also written to ``metrics.json``). Raises
    :class:`TrainError` when the run cannot start or continue as configured."""
    run = prepare_run(cfg)
    state, done = restore(run)
    if done is not None:
        return done
    stopped_early = False
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if cfg.early_stopping_patience and state["bad_epochs"] >= cfg.early_stopping_patience:
            stopped_early = True
            break
        t0 = time.perf_counter()
        record = {"epoch": epoch, **train_epoch(run, epoch, state)}
        fields, improved = validate_epoch(run, epoch, state)
        state["epoch"] = epoch
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + (time.perf_counter() - t0)
        record.update(global_step=state["global_step"], lr=lr_of(run.optimizer, head=False),
                      head_lr=lr_of(run.optimizer, head=True), **fields, best_epoch=state["best_epoch"])
        save_epoch(run, epoch, state, record, improved)

    # ---- calibrate, evaluate, save, card, push ----------------------------------------------------
    result = {}
    accelerator, out = run.accelerator, run.out
    processor, val_split, test_split, test_subset = run.processor, run.val_split, run.test_split, run.test_subset
    run.model = run.optimizer = run.scheduler = run.train_dl = run.val_dl = run.ema = run.teachers = None  # free the training copies
    accelerator.free_memory()
    if accelerator.is_main_process:
        result = finish(cfg, out, processor, val_split, test_split, state, stopped_early, run.progress,
                        accelerator.device, test_subset)
        last = latest_checkpoint(out)
        if last is not None:  # a later --resume of this directory has nothing left to do
            done = json.loads((last / "trainer_state.json").read_text())
            (last / "trainer_state.json").write_text(json.dumps({**done, "finished": True}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def finish(cfg: TrainConfig, out: Path, processor, val_split, test_split, state: dict, stopped_early: bool,
           progress: bool, device: torch.device, test_subset: bool = False) -> dict:
    """Load the best epoch, calibrate on validation, save, then evaluate on test once *the saved
    folder* as users load it (Predictor.from_pretrained), and write the card."""
    from modeling.card import write_model_card
    from modeling.evaluate import calibrate_on, evaluate_model, evaluate_probs
    from modeling.predict import Predictor

    best_dir = out / "checkpoints" / "best"
    written = json.loads((best_dir / "best_epoch.json").read_text())["epoch"] if (best_dir / "best_epoch.json").exists() else None
    if written is not None and written != state["best_epoch"]:
        raise TrainError(f"{best_dir} holds epoch {written} but the training state says the best epoch is "
                         f"{state['best_epoch']} (a crash between the two writes?); resume from an earlier checkpoint")
    model = AutoModelForImageClassification.from_pretrained(best_dir, dtype=torch.float32).to(device)
    cal, val_logits = calibrate_on(model, processor, val_split, target_sensitivity=cfg.target_sensitivity,
                                   batch_size=cfg.eval_batch_size, progress=progress)
    val_labels = np.asarray(val_split["label"])
    logger.info("temperature %.3f (val NLL %.4f -> %.4f); pneumonia threshold %.4f for sensitivity >= %.3f",
                cal.temperature, cal.nll_before, cal.nll_after, cal.pneumonia_threshold, cfg.target_sensitivity)
    if not 0.06 < cal.temperature < 19.0:
        logger.warning("temperature %.3f is at the edge of its search range: validation is probably too small or "
                       "perfectly separated for calibration to mean much", cal.temperature)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    val_probs = softmax(val_logits.astype(np.float64) / cal.temperature)
    metrics = {
        "validation": evaluate_probs(val_probs, val_labels, groups_of(val_split), threshold=cal.pneumonia_threshold,
                                     n_bootstrap=cfg.n_bootstrap, seed=cfg.seed),
        "calibration": asdict(cal),
        "training": {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "stopped_early": stopped_early,
                     "best_val_macro_f1_uncalibrated": state.get("best_val_macro_f1", state["best_metric"]),
                     "selection_metric": cfg.selection_metric, "best_selection_value": state["best_metric"],
                     "wall_seconds": round(state.get("wall_seconds", 0.0), 1)},
    }
    if test_split is not None:
        saved = Predictor.from_pretrained(str(out))
        saved.model.to(device)
        metrics["test"] = evaluate_model(saved.model, saved.processor, test_split, out / "eval_test",
                                         threshold=saved.threshold, split_name="test",
                                         batch_size=cfg.eval_batch_size, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                         progress=progress, extra={"subset": test_subset})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out, cfg=asdict(cfg), metrics=metrics)
    if cfg.push_to_hub:
        metrics["hub_commit"] = push(out, cfg.push_to_hub, private=cfg.hub_private)
    return metrics


def lr_of(optimizer, *, head: bool) -> float:
    """Current LR of the head, or the largest non-head LR (the layers above the last block: the
    un-decayed --learning-rate times the schedule)."""
    lrs = [g["lr"] for g in optimizer.param_groups if bool(g.get("is_head")) == head]
    return max(lrs) if lrs else float("nan")


def push(out: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the model folder (not the checkpoints) in one commit with the real Hub client."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(out),
                             ignore_patterns=["checkpoints/*", "checkpoints/**"],
                             commit_message="Upload model, image processor, calibration and card (train.py)")
    logger.info("pushed to %s (%s)", repo_id, info.oid)
    return info.oid


def run_info(cfg: TrainConfig, precision: str, accelerator: Accelerator, pcfg: PreprocessConfig,
             n_train: int, n_val: int) -> dict:
    import accelerate
    import transformers

    return {
        "config": asdict(cfg), "preprocessing": pcfg.to_dict(), "augmentation": cfg.augment_config().to_dict(),
        "mixed_precision": precision, "num_processes": accelerator.num_processes, "device": str(accelerator.device),
        "n_train": n_train, "n_validation": n_val,
        "command": " ".join(["python" if sys.argv[0].endswith(".py") else "", *sys.argv]).strip(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpu_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }


def main(argv: list[str] | None = None) -> int:
    (cfg,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(argv)
    try:
        metrics = train(cfg)
    except TrainError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    if metrics.get("test"):
        from modeling.metrics import format_summary

        print(format_summary(metrics["test"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

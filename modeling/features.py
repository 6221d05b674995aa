"""Frozen-backbone features of (augmented) views, computed once and cached: what linear probes,
LP-FT's first stage and the robustness scoring of probes are built from.

Why a cache: on two CPU cores a DINOv2-small forward pass costs ~35 ms per image in bfloat16, so
nine views of 4,132 training films take ~20 minutes. A probe is then a logistic regression on the
cached rows (seconds), and every probe variant (features, class weights, regularisation) is scored
on the same features.

Two feature sets per image:

* ``head``: the input of the model's own classification head, captured by a forward pre-hook on
  :func:`modeling.models.classifier_head`. For ``Dinov2ForImageClassification`` that is
  ``[CLS, mean of the patch tokens]`` after the final LayerNorm. A linear probe fit on it *is* a
  weight matrix for the stock head, so the probe can be saved as an ordinary transformers model
  (:func:`modeling.probe.probe_model`): ``pipeline()`` and ``from_pretrained`` need no custom code.
* ``cls_layers`` (DINOv2 only): the CLS token of each of the last ``n_layers`` blocks, each through
  the final LayerNorm (transformers' ``hidden_states`` are taken *before* it): DINOv2's
  linear-evaluation features. A probe on them needs custom code to deploy, so they are compared in
  the recipe table but not released.

The cache is a folder of ``chunk-NNNNN.npz`` files (``chunk`` images x all their views each) plus
``meta.json`` saying what was computed; an interrupted extraction resumes at the first missing chunk,
and a cache made with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .augment import AugmentConfig, augment
from .image_io import to_grayscale
from .models import classifier_head
from .preprocessing import pixel_values


def head_inputs_and_layers(model, pv: torch.Tensor, n_layers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(head input (B, D), layer CLS tokens (B, n_layers, H) or None)`` for a batch of pixel values."""
    captured: list[torch.Tensor] = []
    hook = classifier_head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        out = model(pixel_values=pv, output_hidden_states=n_layers > 0)
    finally:
        hook.remove()
    layers = None
    if n_layers:
        backbone = getattr(model, "dinov2", None)
        if backbone is None:
            raise ValueError(f"per-layer CLS features are implemented for DINOv2 only, not {model.config.model_type}")
        # hidden_states: embeddings + one per block, before the final LayerNorm
        layers = torch.stack([backbone.layernorm(h[:, 0]) for h in out.hidden_states[-n_layers:]], dim=1)
    return captured[0], layers


def features_fn(model, processor, *, n_layers: int = 4, precision: str = "bfloat16"
                ) -> Callable[[list[Image.Image]], np.ndarray]:
    """PIL images -> ``(B, D + n_layers * H)`` float32 rows: ``head`` first, then ``cls_layers``
    flattened. The same signature as a logits function, so
    :func:`modeling.robustness.battery_logits` can compute features under every condition."""
    import copy

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
    net = (copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model).eval()

    def fn(images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            head, layers = head_inputs_and_layers(net, pixel_values(processor, images).to(dtype), n_layers)
            parts = [head.float()] + ([layers.flatten(1).float()] if layers is not None else [])
            return torch.cat(parts, dim=1).numpy()

    return fn


def split_features(rows: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(head, cls_layers flattened)`` from rows made by :func:`features_fn`."""
    return rows[:, :head_dim], rows[:, head_dim:]


@dataclass
class ViewSpec:
    """Which views of each image: the plain image (``plain``) and ``n_augmented`` random views drawn
    with ``aug`` from an RNG seeded by (``seed``, image index, view index), so a resumed extraction
    draws the same views."""

    n_augmented: int = 8
    plain: bool = True
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0

    @property
    def per_image(self) -> int:
        return int(self.plain) + self.n_augmented

    def views(self, img: Image.Image, index: int) -> list[Image.Image]:
        out = [img] if self.plain else []
        for v in range(self.n_augmented):
            out.append(augment(img, self.aug, random.Random(hash((self.seed, index, v)))))
        return out

    def to_dict(self) -> dict:
        return {"n_augmented": self.n_augmented, "plain": self.plain, "aug": self.aug.to_dict(), "seed": self.seed}


def weights_digest(model) -> str:
    """A short digest of the model's weights: the cache key must change when the backbone does."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def extract(model, processor, images: Sequence[Image.Image], labels: Sequence[int], cache_dir: str | Path, *,
            spec: ViewSpec, n_layers: int = 4, precision: str = "bfloat16", chunk: int = 128, batch_size: int = 32,
            meta: dict | None = None, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Features of every view of every image, cached under ``cache_dir``. Returns ``features``
    (rows, D), ``labels``, ``image`` (index of the source image) and ``view`` (0 = plain when
    ``spec.plain``). ``images`` may be a lazy sequence (a ``datasets`` column view)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    want = {"n_images": len(images), "spec": spec.to_dict(), "n_layers": n_layers, "precision": precision,
            "chunk": chunk, "model": weights_digest(model), "processor": processor.to_dict(), **(meta or {})}
    want = json.loads(json.dumps(want, default=str))
    meta_file = cache / "meta.json"
    if meta_file.exists():
        have = json.loads(meta_file.read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{cache} holds features computed with other settings ({', '.join(diff)}); "
                             "use another cache directory")
    else:
        meta_file.write_text(json.dumps(want, indent=2) + "\n")
    fn = features_fn(model, processor, n_layers=n_layers, precision=precision)
    labels = np.asarray(labels, dtype=np.int64)
    parts = []
    for c, start in enumerate(range(0, len(images), chunk)):
        path = cache / f"chunk-{c:05d}.npz"
        if not path.exists():
            idx = list(range(start, min(start + chunk, len(images))))
            view_imgs, img_idx, view_idx = [], [], []
            for i in idx:
                vs = spec.views(to_grayscale(images[i]), i)
                view_imgs += vs
                img_idx += [i] * len(vs)
                view_idx += list(range(len(vs)))
            rows = [fn(view_imgs[b:b + batch_size]) for b in range(0, len(view_imgs), batch_size)]
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, features=np.concatenate(rows).astype(np.float16), image=np.asarray(img_idx, np.int32),
                     view=np.asarray(view_idx, np.int16))
            tmp.replace(path)  # a chunk is either complete or absent
            if progress:
                progress(len(idx))
        with np.load(path) as z:
            parts.append({k: z[k] for k in z.files})
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("features", "image", "view")}
    out["features"] = out["features"].astype(np.float32)
    out["labels"] = labels[out["image"]]
    return out


def spec_from_dict(d: dict) -> ViewSpec:
    aug = dict(d.get("aug", {}))
    for k in ("crop_scale", "crop_ratio"):
        if k in aug:
            aug[k] = tuple(aug[k])
    return ViewSpec(n_augmented=d["n_augmented"], plain=d["plain"], aug=AugmentConfig(**aug), seed=d["seed"])


"""Training-time augmentation for frontal chest X-rays, on PIL images before the image processor.

Each transform models a real source of variation between films, and is kept mild so that it never
removes what the label depends on:

* scale/crop (``crop_scale``): collimation and patient distance vary between sites; crops keep at
  least 80% of the area so both lungs stay in view (a small crop could cut away the consolidation
  and make the label wrong);
* rotation (``max_rotation`` degrees, black fill): patients are rarely perfectly aligned, but
  frontal films are within a few degrees of upright;
* brightness/contrast (``brightness``, ``contrast``): exposure, detector and post-processing differ
  between machines; a gamma jitter covers non-linear display curves;
* no horizontal flip by default (``hflip``): a mirrored chest (heart on the right) is not a real
  film and side markers become mirrored text; it is available for experiments;
* texture (off by default): Gaussian ``noise`` (sigma up to this many grey levels: dose, detector),
  ``blur`` (radius up to this many pixels: resolution, motion) and ``sharpen`` (unsharp mask up to
  this percentage: vendor edge enhancement), each applied to half of the images. They overlap
  conditions of the robustness battery (:mod:`modeling.robustness`); a recipe that uses them must
  keep its ranges below the battery's, and its card must say so.

Written with PIL because torchvision has no CPU build on our target machines; each step is one
Pillow call, seeded through the ``random.Random`` passed in, so runs are reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect change relative to the image's own
    max_rotation: float = 7.0
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: float = 0.15
    hflip: bool = False
    noise: float = 0.0
    blur: float = 0.0
    sharpen: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def random_resized_crop(img: Image.Image, rng: random.Random, scale, ratio) -> Image.Image:
    """A crop of ``scale`` of the area with aspect ``ratio`` x the image's own, at a random place
    (the crop is resized later by the image processor, so no resize here)."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]))) * (w / h)
        cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch))
    return img


def augment(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    """Apply the configured random transforms to a grayscale ("L") or RGB image."""
    if cfg.crop_scale[0] < 1.0:
        img = random_resized_crop(img, rng, cfg.crop_scale, cfg.crop_ratio)
    if cfg.max_rotation > 0:
        img = img.rotate(rng.uniform(-cfg.max_rotation, cfg.max_rotation), resample=Image.Resampling.BILINEAR,
                         fillcolor=0)
    if cfg.brightness > 0:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
    if cfg.contrast > 0:
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
    if cfg.gamma > 0:
        g = math.exp(rng.uniform(math.log(1 - cfg.gamma), math.log(1 + cfg.gamma)))
        img = img.point([min(255, int(round(255 * (i / 255) ** g))) for i in range(256)] * len(img.getbands()))
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.blur > 0 and rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, cfg.blur)))
    if cfg.sharpen > 0 and rng.random() < 0.5:
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.uniform(0, cfg.sharpen)), threshold=0))
    if cfg.noise > 0 and rng.random() < 0.5:
        a = np.asarray(img, dtype=np.float32)
        noisy = a + np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(0, cfg.noise), a.shape)
        img = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), img.mode)
    return img

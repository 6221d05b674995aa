"""Training-time augmentation for frontal chest X-rays, on PIL images before the image processor.

Each transform models a real source of variation between films, and is kept mild so that it never
removes what the label depends on:

* scale/crop (``crop_scale``): collimation and patient distance vary between sites; crops keep at
  least 80% of the area so both lungs stay in view (a small crop could cut away the consolidation
  and make the label wrong);
* zoom out (``zoom_out``, off by default): a smaller child or a wider collimation leaves the chest
  smaller on the detector; the film is shrunk by a factor up to ``zoom_out`` onto a black frame of
  its own size, at a random place, with probability ``zoom_out_p`` (release v5: the battery's worst
  geometry, ``zoom_out_1.25``, at or below its magnitude);
* rotation (``max_rotation`` degrees, black fill): patients are rarely perfectly aligned, but
  frontal films are within a few degrees of upright;
* brightness/contrast (``brightness``, ``contrast``): exposure, detector and post-processing differ
  between machines; a gamma change covers non-linear display curves (``gamma``: log-uniform
  ``1 +- gamma``; or an explicit ``gamma_range``: release v4 samples 0.6-1.6, the battery's two
  gamma conditions, because v3's normals collapsed under them); each tone change is applied with
  probability ``tone_p``;
* no horizontal flip by default (``hflip``): a mirrored chest (heart on the right) is not a real
  film and side markers become mirrored text; it is available for experiments;
* texture (off by default): Gaussian ``noise`` (sigma up to this many grey levels: dose, detector),
  ``blur`` (radius up to this many pixels: resolution, motion), ``sharpen`` (unsharp mask up to
  this percentage: vendor edge enhancement) and JPEG re-encoding at a quality of ``jpeg_quality``
  or more (a PACS export or a web upload), each applied with its own probability (``noise_p``...).
  They overlap conditions of the robustness battery (:mod:`modeling.robustness`); a recipe that
  uses them must keep its magnitudes at or below the battery's, and its card must say which
  battery rows became partly in-distribution.

Written with PIL because torchvision has no CPU build on our target machines; each step is one
Pillow call, seeded through the ``random.Random`` passed in, so runs are reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from .robustness import jpeg as jpeg_reencode  # one JPEG round trip for training and the battery


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect change relative to the image's own
    zoom_out: float = 1.0  # largest shrink factor (1 = off)
    zoom_out_p: float = 0.0
    max_rotation: float = 7.0
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: float = 0.15
    gamma_range: tuple[float, float] | None = None  # overrides ``gamma`` when set
    tone_p: float = 1.0
    hflip: bool = False
    noise: float = 0.0
    noise_p: float = 0.5
    blur: float = 0.0
    blur_p: float = 0.5
    sharpen: float = 0.0
    sharpen_p: float = 0.5
    jpeg_quality: int = 0  # lowest JPEG quality of the re-encoding; 0 = off
    jpeg_p: float = 0.5

    def __post_init__(self) -> None:
        if self.zoom_out < 1.0:
            raise ValueError(f"zoom_out is a shrink factor >= 1 (1 = off), got {self.zoom_out}")
        for name in ("zoom_out_p", "tone_p", "noise_p", "blur_p", "sharpen_p", "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.gamma_range is not None:
            lo, hi = self.gamma_range
            if not 0 < lo <= hi:
                raise ValueError(f"gamma_range must be 0 < low <= high, got {self.gamma_range}")
        if not (self.jpeg_quality == 0 or 1 <= self.jpeg_quality <= 95):
            raise ValueError(f"jpeg_quality is a JPEG quality in 1-95 (0 = off), got {self.jpeg_quality}")

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


def random_zoom_out(img: Image.Image, rng: random.Random, max_factor: float) -> Image.Image:
    """The film shrunk by a factor in [1, ``max_factor``] and pasted at a random place on a black
    frame of its own size (:func:`modeling.robustness.zoom` is the centred, fixed-factor version)."""
    w, h = img.size
    f = rng.uniform(1.0, max_factor)
    sw, sh = max(1, round(w / f)), max(1, round(h / f))
    canvas = Image.new(img.mode, (w, h), 0)
    canvas.paste(img.resize((sw, sh), Image.Resampling.BICUBIC), (rng.randint(0, w - sw), rng.randint(0, h - sh)))
    return canvas


def augment(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    """Apply the configured random transforms to a grayscale ("L") or RGB image."""
    if cfg.crop_scale[0] < 1.0:
        img = random_resized_crop(img, rng, cfg.crop_scale, cfg.crop_ratio)
    if cfg.zoom_out > 1.0 and cfg.zoom_out_p > 0 and rng.random() < cfg.zoom_out_p:
        img = random_zoom_out(img, rng, cfg.zoom_out)
    if cfg.max_rotation > 0:
        img = img.rotate(rng.uniform(-cfg.max_rotation, cfg.max_rotation), resample=Image.Resampling.BILINEAR,
                         fillcolor=0)
    if cfg.brightness > 0 and _happens(rng, cfg.tone_p):
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
    if cfg.contrast > 0 and _happens(rng, cfg.tone_p):
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
    lo, hi = cfg.gamma_range or (1 - cfg.gamma, 1 + cfg.gamma)
    if hi > lo and _happens(rng, cfg.tone_p):
        g = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        img = img.point([min(255, int(round(255 * (i / 255) ** g))) for i in range(256)] * len(img.getbands()))
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.blur > 0 and rng.random() < cfg.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, cfg.blur)))
    if cfg.sharpen > 0 and rng.random() < cfg.sharpen_p:
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.uniform(0, cfg.sharpen)), threshold=0))
    if cfg.noise > 0 and rng.random() < cfg.noise_p:
        a = np.asarray(img, dtype=np.float32)
        noisy = a + np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(0, cfg.noise), a.shape)
        img = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), img.mode)
    if cfg.jpeg_quality > 0 and rng.random() < cfg.jpeg_p:
        img = jpeg_reencode(img, rng.randint(cfg.jpeg_quality, 95))
    return img


def _happens(rng: random.Random, p: float) -> bool:
    # p = 1 draws nothing, so the random stream of runs made before tone_p existed is unchanged
    return p >= 1.0 or rng.random() < p

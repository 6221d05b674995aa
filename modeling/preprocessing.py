"""Preprocessing: the one definition of what the network sees, saved with the model.

The model's image processor (``preprocessor_config.json``) *is* the preprocessing: ``train.py``
builds it here, applies it to every training and evaluation image, and saves it beside the weights;
the predictor, the Space and ``transformers.pipeline("image-classification", model=DIR)`` all load
that saved file. There is no second copy of the resize/normalise rules to drift out of sync.

We deliberately use stock ``transformers`` processors so that a plain ``pipeline(...)`` works without
``trust_remote_code``:

* plain resize: ``ViTImageProcessor`` (resize to ``size x size``, rescale, normalise);
* letterbox: ``DonutImageProcessor`` with ``do_thumbnail`` + ``do_pad`` (scale the long side to
  ``size`` keeping the aspect ratio, pad with black, centred). Chest films come in many aspect
  ratios; letterboxing keeps the anatomy's proportions (heart size, lung shape) instead of
  squashing them, at the cost of spending pixels on padding;
* centre crop (``crop_pct < 1``): ``DeiTImageProcessor`` (resize to ``round(size / crop_pct)``
  square, centre-crop ``size``), timm's ``crop_pct``. Training augments with random crops of 64-100%
  of the area, so at evaluation the network has mostly seen films a little zoomed in; a centre crop
  matches that and drops the film's edges (side markers, text, collimation borders). The fraction
  is chosen on validation (``benchmarks/checkpoint_variants.py``) and saved with the model like
  everything else here.

Both are used through their PIL backends (``*Pil`` classes): transformers' default backends need
torchvision, which has no CPU build here, and the PIL backend gives the same numbers wherever the
model is loaded.

Grayscale: X-rays are single-channel. Every image is first reduced to 8-bit "L" by
:mod:`modeling.image_io` (the one loader) and replicated to three channels (:func:`to_model_image`)
because pretrained backbones take RGB. A grayscale file read by ``pipeline()`` (which converts to
RGB) therefore gives the same tensor as our predictor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
from transformers.models.donut.image_processing_pil_donut import DonutImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from .image_io import to_grayscale

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass
class PreprocessConfig:
    """What the network sees. ``size``: square input side in pixels (a multiple of the patch size
    for ViTs). ``letterbox``: keep the aspect ratio and pad with black instead of stretching.
    ``image_mean``/``image_std``: the base model's normalisation (taken from its processor).
    ``crop_pct``: fraction of the (stretched) image side kept by a centre crop (1 = no crop)."""

    size: int = 224
    letterbox: bool = False
    resample: str = "bicubic"
    image_mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    image_std: tuple[float, float, float] = field(default=IMAGENET_STD)
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        if not 0.5 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.5, 1], got {self.crop_pct}")
        if self.letterbox and self.crop_pct < 1.0:
            raise ValueError("crop_pct < 1 with letterbox is not supported: a centre crop would cut into the "
                             "padding on one axis and the anatomy on the other")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)

    def to_dict(self) -> dict:
        return asdict(self)


def build_image_processor(cfg: PreprocessConfig) -> BaseImageProcessor:
    """The stock transformers image processor that implements ``cfg`` (see the module docstring)."""
    common = dict(
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        resample=_RESAMPLE[cfg.resample],
    )
    if cfg.letterbox:
        # do_resize scales the short side to `size`, do_thumbnail then shrinks so that the long side
        # fits, do_pad centres the result on a black square (pad value 0 before normalisation).
        return DonutImageProcessorPil(
            do_resize=True,
            size={"height": cfg.size, "width": cfg.size},
            do_thumbnail=True,
            do_align_long_axis=False,
            do_pad=True,
            **common,
        )
    if cfg.crop_pct < 1.0:
        resized = resized_side(cfg.size, cfg.crop_pct)
        return DeiTImageProcessorPil(do_resize=True, size={"height": resized, "width": resized},
                                     do_center_crop=True, crop_size={"height": cfg.size, "width": cfg.size}, **common)
    return ViTImageProcessorPil(do_resize=True, size={"height": cfg.size, "width": cfg.size}, **common)


def resized_side(size: int, crop_pct: float) -> int:
    """The square side an image is resized to before the centre crop of ``size``."""
    return int(round(size / crop_pct))


def crop_fraction(processor: BaseImageProcessor) -> float:
    """Fraction of the resized image's side that the processor's centre crop keeps (1 = no crop):
    what :func:`modeling.gradcam.cam_to_image` needs to put a heatmap back on the whole film."""
    if not getattr(processor, "do_center_crop", False) or not getattr(processor, "crop_size", None):
        return 1.0
    size = processor.size or {}
    if "height" not in size:  # shortest_edge resizing keeps the aspect ratio: not one of ours
        raise ValueError(f"centre crop after an aspect-preserving resize ({size}) is not supported")
    return float(processor.crop_size["height"]) / float(size["height"])


def config_from_processor(processor: BaseImageProcessor) -> PreprocessConfig:
    """Read a :class:`PreprocessConfig` back from a saved processor (ours, or a base model's own,
    from which only the normalisation is taken when it is not one of ours)."""
    size = processor.size or {}
    side = size.get("height") or size.get("shortest_edge") or 224
    resample = {v: k for k, v in _RESAMPLE.items()}.get(Image.Resampling(int(processor.resample)), "bicubic")
    letterbox = is_letterbox(processor)
    crop_pct = 1.0
    if "height" in size and (crop := crop_fraction(processor)) < 1.0:
        crop_pct, side = round(crop, 4), processor.crop_size["height"]
    return PreprocessConfig(
        size=int(side),
        letterbox=letterbox,
        resample=resample,
        image_mean=tuple(processor.image_mean or IMAGENET_MEAN),
        image_std=tuple(processor.image_std or IMAGENET_STD),
        crop_pct=crop_pct,
    )


def is_letterbox(processor: BaseImageProcessor) -> bool:
    return bool(getattr(processor, "do_thumbnail", False) and getattr(processor, "do_pad", False))


def to_model_image(image: Image.Image) -> Image.Image:
    """Grayscale (the loader's rules) replicated to RGB: what every processor call receives."""
    gray = image if image.mode == "L" else to_grayscale(image)
    return gray.convert("RGB")


def pixel_values(processor: BaseImageProcessor, images: list[Image.Image]) -> torch.Tensor:
    """Batch tensor (B, 3, H, W) float32 for already-loaded PIL images, exactly as ``processor`` makes it.
    A film is first resized in grayscale to the size the processor resizes to, with its filter
    (:func:`presized`): the processor's own resize is then a copy. Pillow resizes each band alike, so
    the tensor is the same to the bit (tested); converting a 2048 px film to RGB and resizing three bands
    took ~35 ms of a ~200 ms archive film (benchmarks/archive.py), the single band ~8."""
    target = resize_target(processor)
    batch = processor([to_model_image(presized(im, target, processor)) for im in images],
                      return_tensors="pt")["pixel_values"]
    return batch.to(torch.float32)


#: Processor classes whose first step is a plain resize of the whole image to ``size`` (the ones
#: :func:`build_image_processor` makes without a letterbox: ViT's, and DeiT's with its centre crop after).
#: Others may crop first, keep the aspect ratio or scale ``size`` (Perceiver, DPT, PoolFormer...): they
#: get the film as it is.
_STRETCH_FIRST = ("ViTImageProcessor", "ViTImageProcessorPil", "DeiTImageProcessor", "DeiTImageProcessorPil")


def resize_target(processor: BaseImageProcessor) -> tuple[int, int] | None:
    """(width, height) a processor resizes every image to before anything else, or None when it may do
    something else first (a letterbox's aspect-keeping thumbnail, a shortest-edge resize, another class)."""
    size = getattr(processor, "size", None) or {}
    if (type(processor).__name__ not in _STRETCH_FIRST or not getattr(processor, "do_resize", False)
            or is_letterbox(processor) or getattr(processor, "resample", None) is None
            or "height" not in size or "width" not in size):
        return None
    return int(size["width"]), int(size["height"])


def presized(image: Image.Image, target: tuple[int, int] | None, processor: BaseImageProcessor) -> Image.Image:
    """The grayscale film resized to ``target`` with the processor's filter (unchanged without one)."""
    gray = image if image.mode == "L" else to_grayscale(image)
    if target is None or gray.size == target:
        return gray
    return gray.resize(target, Image.Resampling(int(processor.resample)))

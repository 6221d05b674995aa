"""Grad-CAM heatmaps for every supported classifier family, computed with pytorch-grad-cam.

The heatmap answers "which part of the X-ray drove this class score". It is shown next to every
prediction in the Space, so it has to be computed on the very forward pass that produced the
prediction (:class:`GradCam` returns those logits with the map) and it has to land on the right
pixels of the original image (:func:`cam_to_image` undoes the preprocessing geometry).

Supported families (``model.config.model_type``), all loaded with
``AutoModelForImageClassification``:

============================  ===========================================  =======================
family                        target layer                                 activation layout
============================  ===========================================  =======================
``vit``                       last encoder layer's ``layernorm_before``    tokens: CLS + patches
``dinov2``                    last encoder layer's ``norm1``               tokens: CLS + patches
``dinov2_with_registers``     last encoder layer's ``norm1``               CLS + registers + patches
``convnext``, ``convnextv2``  last encoder stage                           (B, C, H, W) feature map
============================  ===========================================  =======================

Token layers are reshaped to a (B, C, h, w) grid (prefix tokens dropped) with h, w taken from the
actual input size, so non-square inputs work.

torchvision
-----------
pytorch-grad-cam imports torchvision, which has no CPU wheel here: :mod:`modeling.grad_cam_import`
imports it with torch-only stand-ins that are removed again right after (that module says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

__all__ = [
    "SUPPORTED_FAMILIES",
    "CamResult",
    "ClassifierLogits",
    "GradCam",
    "cam_to_image",
    "import_pytorch_grad_cam",
    "letterbox_box",
    "model_family",
    "overlay",
    "reshape_transform",
    "target_layers",
]

from .grad_cam_import import import_pytorch_grad_cam  # noqa: E402

pytorch_grad_cam = import_pytorch_grad_cam()
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Per-family model anatomy
# --------------------------------------------------------------------------------------------------

# model_type -> (attribute of the base model on the *ForImageClassification model, layout)
_FAMILIES: dict[str, tuple[str, str]] = {
    "vit": ("vit", "tokens"),
    "dinov2": ("dinov2", "tokens"),
    "dinov2_with_registers": ("dinov2_with_registers", "tokens"),
    "convnext": ("convnext", "conv"),
    "convnextv2": ("convnextv2", "conv"),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def model_family(model: nn.Module) -> str:
    """The family of an ``AutoModelForImageClassification`` model: its ``config.model_type``.

    Raises ValueError, naming the supported families, for anything else (including a headless base
    model: Grad-CAM needs the classifier's logits)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"Grad-CAM does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    base_attr = _FAMILIES[model_type][0]
    if not hasattr(model, base_attr) or not hasattr(model, "classifier"):
        raise ValueError(
            f"{type(model).__name__} is not an image-classification model (no .{base_attr} and "
            ".classifier); load it with AutoModelForImageClassification"
        )
    return model_type


def target_layers(model: nn.Module) -> list[nn.Module]:
    """The layer whose activations and gradients make the map, per family.

    Transformers: a block's first LayerNorm (ViT ``layernorm_before``, DINOv2 ``norm1``), as in
    pytorch-grad-cam's ViT tutorial: the final LayerNorm/pooling mixes tokens or keeps only CLS, so
    the last spatially resolved tensor with a gradient from the class score is the input of an
    attention. ViT: the last block's. DINOv2: the second-to-last block's, chosen by measurement on the
    released model (``benchmarks/heatmap_faithfulness.py``, 48 validation films): ROAD combined 0.126
    against 0.033 for the last block's, and 30% of the heat in the central third of the film (spine,
    mediastinum) against 59%; the last block's map sat mostly on the spine. ConvNeXt: the output of
    the last stage, the last (B, C, H, W) map."""
    family = model_family(model)
    base = getattr(model, _FAMILIES[family][0])
    if family == "vit":
        return [_transformer_blocks(base)[-1].layernorm_before]
    if family in ("dinov2", "dinov2_with_registers"):
        blocks = _transformer_blocks(base)
        return [blocks[-2 if len(blocks) > 1 else -1].norm1]
    return [base.encoder.stages[-1]]


def _transformer_blocks(base: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks. transformers 5.x moved ViT's from ``encoder.layer`` to
    ``layers`` on the model itself (DINOv2 keeps ``encoder.layer``), so look in each place."""
    for path in (("layers",), ("encoder", "layer"), ("encoder", "layers")):
        obj = base
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the transformer blocks of {type(base).__name__}")


def _num_prefix_tokens(model: nn.Module) -> int:
    """Tokens in front of the patch tokens: CLS, plus DINOv2's register tokens."""
    family = model_family(model)
    if family == "dinov2_with_registers":
        return 1 + int(model.config.num_register_tokens)
    return 1


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def reshape_transform(
    model: nn.Module,
    input_hw: Callable[[], tuple[int, int] | None] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For token models, a function (B, N, C) -> (B, C, h, w) dropping CLS/register tokens;
    ``None`` for ConvNeXt (already (B, C, H, W)).

    pytorch-grad-cam averages gradients over the two trailing spatial axes, so tokens must become a
    grid. The grid is ``(H // patch, W // patch)`` of the input actually fed (the patch embedding is
    a stride-``patch`` convolution), read from ``input_hw()`` when given (:class:`GradCam` passes
    its wrapper's record of the last input); without it the grid must be square. Either way the
    token count is checked, so a wrong geometry fails loudly instead of scrambling the map.
    """
    family = model_family(model)
    if _FAMILIES[family][1] == "conv":
        return None
    prefix = _num_prefix_tokens(model)
    ph, pw = _pair(model.config.patch_size)

    def transform(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            raise ValueError(f"expected (batch, tokens, channels), got shape {tuple(tokens.shape)}")
        b, n, c = tokens.shape
        n_patches = n - prefix
        hw = input_hw() if input_hw is not None else None
        if hw is not None:
            h, w = hw[0] // ph, hw[1] // pw
        else:
            h = w = math.isqrt(max(n_patches, 0))
        if h * w != n_patches:
            raise ValueError(
                f"{n} tokens minus {prefix} prefix tokens do not form a {h}x{w} patch grid "
                f"(input size {hw}, patch {ph}x{pw}); pass the input size for non-square inputs"
            )
        return tokens[:, prefix:, :].reshape(b, h, w, c).permute(0, 3, 1, 2)

    return transform


class ClassifierLogits(nn.Module):
    """Wraps a Hugging Face classifier so its forward returns the logits tensor.

    pytorch-grad-cam indexes the model output directly (``output[:, class]``), so it cannot take a
    ``ModelOutput``. The wrapper also records the last input's (H, W), which the token reshape needs
    for non-square inputs, and asks ViT to interpolate its position embeddings when the input is not
    the configured size (DINOv2 always interpolates; ConvNeXt takes any size)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.family = model_family(model)
        self.last_input_hw: tuple[int, int] | None = None

    def input_hw(self) -> tuple[int, int] | None:
        return self.last_input_hw

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.last_input_hw = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        kwargs = {}
        if self.family == "vit" and self.last_input_hw != _pair(self.model.config.image_size):
            kwargs["interpolate_pos_encoding"] = True
        # float32 logits whatever the model's dtype: pytorch-grad-cam reads them with numpy (no bf16)
        return self.model(pixel_values=pixel_values, **kwargs).logits.float()


# --------------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------------


@dataclass
class CamResult:
    """One explain() call.

    maps: (B, H, W) float32 in [0, 1], the input size; each map is min-max scaled on its own
        (pytorch-grad-cam does that), so it says where, not how strongly. All zeros when no region
        has a positive contribution.
    logits: (B, num_labels), detached, from the same forward pass as the maps.
    target_classes: the class each map explains (the predicted one when none was asked for).
    """

    maps: np.ndarray
    logits: torch.Tensor
    target_classes: list[int]


def _cut_graph_hook(module: nn.Module, args, output):
    """Forward hook: make the target layer's output a fresh leaf that requires grad.

    Grad-CAM only needs d(score)/d(target activation). Cutting the graph there means the backward
    pass runs through the last block and the head only, instead of the whole network down to the
    input, and nothing below the target layer keeps activations for backward. The values, and so
    the logits, are unchanged."""
    if isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return None


class GradCam:
    """Grad-CAM for one model: ``GradCam(model)(pixel_values, target_classes=None)``.

    Each call makes exactly one forward and one backward pass with ``pytorch_grad_cam.GradCAM`` and
    ``ClassifierOutputTarget`` and leaves the model as it found it: hooks exist only during the call
    (pytorch-grad-cam's hooks would otherwise record activations on every later ordinary forward),
    parameters' ``requires_grad`` flags and ``.grad`` tensors are restored (pytorch-grad-cam calls
    ``model.zero_grad()``, which would wipe gradients a training loop is accumulating), and the
    train/eval mode of every submodule is restored. During the call the model is in eval mode and
    all parameters are frozen, so no parameter gradient is computed at all.

    Works under ``torch.no_grad()`` / ``torch.inference_mode()`` (gradients are switched back on
    inside). Not thread-safe for one model: use one call at a time.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = model_family(model)
        self.num_labels = int(model.config.num_labels)
        self._wrapper = ClassifierLogits(model)
        self._target_layers = target_layers(model)
        grid = reshape_transform(model, self._wrapper.input_hw)
        # Activations and gradients go to numpy inside pytorch-grad-cam: made float32 here, so a
        # bfloat16 model (the Predictor's fast copy) explains in one pass of its own precision.
        self._reshape = (lambda t: grid(t).float()) if grid is not None else (lambda t: t.float())

    def _check(self, pixel_values: torch.Tensor, target_classes) -> list[int] | None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a (batch, channels, height, width) tensor")
        channels = int(getattr(self.model.config, "num_channels", 3))
        if pixel_values.shape[1] != channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, the model takes {channels}")
        if target_classes is None:
            return None
        classes = [int(c) for c in target_classes]
        if len(classes) != pixel_values.shape[0]:
            raise ValueError(f"{len(classes)} target classes for a batch of {pixel_values.shape[0]}")
        bad = [c for c in classes if not 0 <= c < self.num_labels]
        if bad:
            raise ValueError(f"target classes {bad} out of range for {self.num_labels} labels")
        return classes

    def explain(self, pixel_values: torch.Tensor, target_classes: Sequence[int] | None = None) -> CamResult:
        """Grad-CAM maps for a (B, C, H, W) batch, one per image, for ``target_classes`` (one class
        per image) or for each image's predicted class."""
        classes = self._check(pixel_values, target_classes)
        targets = None if classes is None else [ClassifierOutputTarget(c) for c in classes]

        params = list(self.model.parameters())
        saved_params = [(p, p.requires_grad, p.grad) for p in params]
        saved_modes = [(m, m.training) for m in self.model.modules()]
        cut_handles = [layer.register_forward_hook(_cut_graph_hook, prepend=True) for layer in self._target_layers]
        cam = None
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.inference_mode(False), torch.enable_grad():
                # A clone is a normal tensor even when the input was made under inference_mode.
                x = pixel_values.detach().clone()
                cam = pytorch_grad_cam.GradCAM(
                    model=self._wrapper, target_layers=self._target_layers, reshape_transform=self._reshape
                )  # its __init__ puts the model in eval mode
                maps = cam(input_tensor=x, targets=targets)
                grid = tuple(cam.activations_and_grads.activations[0].shape[-2:])
                if grid == (1, 1):
                    # min-max scaling turns a 1x1 map into all zeros: say so instead of returning it
                    raise ValueError(
                        f"the target layer's activation is 1x1 for a {tuple(x.shape[-2:])} input, so Grad-CAM "
                        "has no spatial resolution; use a larger input"
                    )
                # BaseCAM.forward keeps the forward's output in .outputs: the logits we return.
                outputs = cam.outputs.detach()
            if classes is None:
                # Same expression BaseCAM uses to pick its targets, so ties resolve identically.
                classes = [int(c) for c in np.argmax(outputs.cpu().numpy(), axis=-1)]
        finally:
            if cam is not None:
                # Not `with cam:`: BaseCAM.__exit__ swallows IndexError (prints it, returns None).
                cam.activations_and_grads.release()
                cam.outputs = None  # it holds the retained graph (backward(retain_graph=True))
            for h in cut_handles:
                h.remove()
            for p, requires_grad, grad in saved_params:
                p.requires_grad_(requires_grad)
                p.grad = grad
            for m, training in saved_modes:
                m.training = training
        maps = np.clip(maps, 0.0, 1.0).astype(np.float32, copy=False)
        return CamResult(maps=maps, logits=outputs, target_classes=classes)

    __call__ = explain


# --------------------------------------------------------------------------------------------------
# Back to the original image
# --------------------------------------------------------------------------------------------------


def letterbox_box(image_size: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image of ``image_size`` (W, H) lies inside a letterboxed model input of
    ``input_size`` (W, H), as (left, top, width, height) in input pixels.

    Replicates ``transformers.DonutImageProcessor`` (5.23, PIL backend ``DonutImageProcessorPil``)
    with ``do_resize=True, do_thumbnail=True, do_pad=True, do_align_long_axis=False``, integer
    rounding included:

    1. resize: shortest edge -> ``min(out_h, out_w)``, long edge ``int(short_target * long / short)``
       (``get_resize_output_image_size``, truncating);
    2. thumbnail: clamp each side to the output, and when one side was clamped, shrink the other as
       ``int(other * clamped / side)`` (truncating; an image already inside is left alone);
    3. pad with zeros, centred: ``top = (out_h - h) // 2``, ``left = (out_w - w) // 2``; the odd pixel
       goes to the bottom / right.
    """
    w0, h0 = int(image_size[0]), int(image_size[1])
    out_w, out_h = int(input_size[0]), int(input_size[1])
    if min(w0, h0, out_w, out_h) <= 0:
        raise ValueError(f"sizes must be positive, got image {image_size} and input {input_size}")
    # 1. resize, shortest edge (transformers.image_transforms.get_resize_output_image_size)
    s = min(out_h, out_w)
    short, long = (w0, h0) if w0 <= h0 else (h0, w0)
    new_short, new_long = s, int(s * long / short)
    h1, w1 = (new_long, new_short) if w0 <= h0 else (new_short, new_long)
    # 2. thumbnail (DonutImageProcessorPil.thumbnail)
    h2, w2 = min(h1, out_h), min(w1, out_w)
    if not (h2 == h1 and w2 == w1):
        if h1 > w1:
            w2 = int(w1 * h2 / h1)
        elif w1 > h1:
            h2 = int(h1 * w2 / w1)
    # 3. centred pad (DonutImageProcessorPil.pad_image, random_padding=False)
    top, left = (out_h - h2) // 2, (out_w - w2) // 2
    return left, top, w2, h2


def cam_to_image(cam: np.ndarray, image_size: tuple[int, int], letterbox: bool, crop_pct: float = 1.0) -> np.ndarray:
    """Map a (h, w) map computed on the model input back onto the original image of ``image_size``
    (W, H): returns (H, W) float32 in [0, 1].

    ``letterbox=False``: the input was the whole image resized to the input size, so the map is just
    resized back (aspect distortion undone). ``letterbox=True``: the input was the image scaled to
    fit and zero-padded (DonutImageProcessor, see :func:`letterbox_box`), so the padding is cropped
    away first. ``crop_pct < 1``: the input was the centre ``crop_pct`` of the resized image on each
    axis (DeiTImageProcessor, see :func:`modeling.preprocessing.crop_fraction`), so the map covers
    that centre box and the border the network never saw is 0. Bilinear resizing keeps the values
    within [0, 1]."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a single (h, w) map, got shape {cam.shape}")
    width, height = int(image_size[0]), int(image_size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be a positive (width, height), got {image_size}")
    if letterbox:
        left, top, w, h = letterbox_box((width, height), (cam.shape[1], cam.shape[0]))
        cam = cam[top : top + h, left : left + w]
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if crop_pct < 1:
        if letterbox:
            raise ValueError("a centre crop with letterbox is not a preprocessing this project builds")
        w, h = max(1, round(width * crop_pct)), max(1, round(height * crop_pct))
        left, top = (width - w) // 2, (height - h) // 2
        out = np.zeros((height, width), dtype=np.float32)
        out[top : top + h, left : left + w] = cv2.resize(np.ascontiguousarray(cam), (w, h),
                                                         interpolation=cv2.INTER_LINEAR)
        return np.clip(out, 0.0, 1.0)
    out = cv2.resize(np.ascontiguousarray(cam), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _as_rgb_float(image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image of any mode or a uint8 array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            # Same pixels the model saw: the project loader's rules (16-bit scaled, not clipped;
            # alpha onto black; palette expanded). Lazy import: it pulls in pydicom.
            from modeling.image_io import to_grayscale

            image = to_grayscale(image).convert("RGB")
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        elif arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]
        elif not (arr.ndim == 3 and arr.shape[2] == 3):
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    return arr.astype(np.float32) / 255.0


def overlay(image, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The JET heatmap of ``cam`` blended over ``image``: (H, W, 3) uint8 RGB.

    ``image``: PIL image (any mode; non-RGB goes through the project's grayscale rules) or a uint8
    array (H, W), (H, W, 3) RGB or (H, W, 4). ``cam``: (H, W) in [0, 1], image-sized (use
    :func:`cam_to_image` first); ``alpha`` is the heatmap's weight. Drawn by pytorch-grad-cam's
    ``show_cam_on_image``, which rescales the blend so its brightest pixel is 255."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _as_rgb_float(image)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != img.shape[:2]:
        raise ValueError(
            f"cam shape {cam.shape} does not match the image (H, W) {img.shape[:2]}; map it with cam_to_image first"
        )
    cam = np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0)
    return show_cam_on_image(img, cam, use_rgb=True, colormap=cv2.COLORMAP_JET, image_weight=1.0 - alpha)

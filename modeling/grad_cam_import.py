"""Importing pytorch-grad-cam without torchvision.

pytorch-grad-cam imports torchvision at import time, for three helpers we never call (an ImageNet
``preprocess_image``, a detection target's ``box_iou``, SESS's ``resize``). There is no CPU
torchvision wheel that matches this project's torch, and PyPI's breaks transformers, so
:func:`import_pytorch_grad_cam` lends it small torch-only stand-ins for the duration of that import
and takes them out of ``sys.modules`` again. Leaving them there would make transformers believe
torchvision is installed (``is_torchvision_available()`` calls ``importlib.util.find_spec``, which
answers from ``sys.modules``) and pick its torchvision image-processor backend, which would then
fail. When a real torchvision is installed, it is imported normally and no stand-in is made.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

import numpy as np
import torch


_TORCHVISION_STANDIN_NAMES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
)
_import_lock = threading.Lock()


def _make_torchvision_standins() -> dict[str, types.ModuleType]:
    """Minimal torch-only replacements for the torchvision names pytorch-grad-cam imports.

    Only what pytorch-grad-cam 1.5.x touches: ``transforms.Compose/Normalize/ToTensor`` (its
    ``utils.image.preprocess_image``), ``transforms.functional.resize`` (``sess.SESS``) and
    ``ops.box_iou`` (``FasterRCNNBoxScoreTarget``). None of them is on our Grad-CAM path, but they
    behave like torchvision's so that those helpers still work if someone calls them.
    """

    def module(name: str, is_package: bool) -> types.ModuleType:
        mod = types.ModuleType(name, "torch-only stand-in for torchvision, used by modeling.gradcam")
        # A real ModuleSpec: importlib.util.find_spec raises ValueError on a module whose __spec__ is
        # None, so a stand-in without one could break other libraries' checks during the import.
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
        if is_package:
            mod.__path__ = []
        mod.__version__ = "0.0.0+modeling.gradcam.standin"
        return mod

    class Compose:
        def __init__(self, transforms):
            self.transforms = list(transforms)

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class ToTensor:
        """HWC (or HW) PIL image / ndarray -> CHW float tensor; uint8 is scaled to [0, 1]."""

        def __call__(self, pic):
            arr = np.array(pic, copy=True)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            if t.dtype == torch.uint8:
                return t.float().div(255)
            return t

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = mean, std

        def __call__(self, t):
            mean = torch.as_tensor(self.mean, dtype=t.dtype, device=t.device).reshape(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=t.dtype, device=t.device).reshape(-1, 1, 1)
            return (t - mean) / std

    def resize(img, size, interpolation=None, max_size=None, antialias=True):
        """Tensor-only ``torchvision.transforms.functional.resize`` (bilinear, antialiased)."""
        h, w = img.shape[-2:]
        if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
            s = size if isinstance(size, int) else size[0]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = s, int(s * long / short)
            if max_size is not None and new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            new_h, new_w = size
        flat = img.reshape(-1, 1, h, w)
        out = torch.nn.functional.interpolate(
            flat.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=antialias
        )
        return out.to(img.dtype).reshape(*img.shape[:-2], new_h, new_w)

    def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
        """Pairwise IoU of (N, 4) and (M, 4) boxes in (x1, y1, x2, y2) format -> (N, M)."""
        area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
        area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
        lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
        rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        return inter / (area1[:, None] + area2[None, :] - inter)

    tv = module("torchvision", True)
    transforms = module("torchvision.transforms", True)
    functional = module("torchvision.transforms.functional", False)
    ops = module("torchvision.ops", False)
    transforms.Compose, transforms.ToTensor, transforms.Normalize = Compose, ToTensor, Normalize
    functional.resize = resize
    transforms.functional = functional
    ops.box_iou = box_iou
    tv.transforms, tv.ops = transforms, ops
    return {m.__name__: m for m in (tv, transforms, functional, ops)}


def import_pytorch_grad_cam(*submodules: str) -> types.ModuleType:
    """Import and return ``pytorch_grad_cam``, lending it torchvision stand-ins only if needed.

    With torchvision genuinely not installed (not imported, and ``find_spec`` finds nothing), the
    stand-ins from :func:`_make_torchvision_standins` sit in ``sys.modules`` only while
    ``pytorch_grad_cam`` is imported and are removed right after, success or not. pytorch-grad-cam's
    modules keep their own references to the stand-in objects, so its helpers keep working, while
    ``import torchvision``, ``find_spec("torchvision")`` and transformers'
    ``is_torchvision_available()`` keep saying "not installed" (so image processors stay on their
    PIL backend). With a real torchvision installed, this is a plain import. ``submodules`` (e.g.
    ``"metrics.road"``, which imports torchvision itself) are imported under the same stand-ins.
    """
    with _import_lock:
        names = ["pytorch_grad_cam", *(f"pytorch_grad_cam.{m}" for m in submodules)]
        if all(n in sys.modules for n in names):
            return sys.modules["pytorch_grad_cam"]
        if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
            for n in names:
                importlib.import_module(n)
            return sys.modules["pytorch_grad_cam"]
        standins = _make_torchvision_standins()
        sys.modules.update(standins)
        try:
            for n in names:
                importlib.import_module(n)
            return sys.modules["pytorch_grad_cam"]
        finally:
            for name, mod in standins.items():
                if sys.modules.get(name) is mod:
                    del sys.modules[name]



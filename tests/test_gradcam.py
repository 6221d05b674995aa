"""Tests for modeling.gradcam: Grad-CAM through pytorch-grad-cam for every supported family.

Models are the tiny random bases of tests/tiny_models.py (plus a tiny DINOv2-with-registers), loaded
with three labels and trained for a few dozen steps on a learnable synthetic task (a bright square;
the class is the horizontal third it lies in), so the maps have structure to show: a random head
can give an all-zero map after Grad-CAM's ReLU, and we do not want to weaken "not constant" for it.

ConvNeXt families run at 128x128, not 32x32: the tiny ConvNeXt has a total stride of 32, so at 32x32
its last stage (the target layer) is 1x1 and no Grad-CAM can be spatial there (GradCam refuses it,
see test_conv_input_too_small_is_refused). Token models run at 32x32 and at a non-square 32x48.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, Dinov2WithRegistersConfig
from transformers.utils import logging as hf_logging

from conftest import ROOT
from modeling import gradcam
from modeling.gradcam import (
    CamResult,
    ClassifierLogits,
    GradCam,
    cam_to_image,
    letterbox_box,
    model_family,
    overlay,
    reshape_transform,
    target_layers,
)
from tiny_models import FAMILIES, save_tiny_base

hf_logging.set_verbosity_error()  # the "newly initialized classifier" load report, expected here

ALL_FAMILIES = (*FAMILIES, "dinov2_with_registers")
TOKEN_FAMILIES = ("vit", "dinov2", "dinov2_with_registers")
DINOV2_SMALL = Path(__file__).resolve().parents[2] / "shared/models/dinov2-small"


def input_size(family: str) -> tuple[int, int]:
    return (32, 32) if family in TOKEN_FAMILIES else (128, 128)


def synthetic_batch(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus one bright square; label = which horizontal third of the image the square is in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=gen) * 0.3
    labels = torch.randint(0, 3, (n,), generator=gen)
    s, band = min(h, w) // 4, w // 3
    for i in range(n):
        cx = int(labels[i]) * band + int(torch.randint(0, band - s + 1, (1,), generator=gen))
        cy = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        x[i, :, cy : cy + s, cx : cx + s] += 2.0
    return x, labels


def load_tiny(family: str, out_dir: Path) -> torch.nn.Module:
    if family == "dinov2_with_registers":
        torch.manual_seed(0)
        cfg = Dinov2WithRegistersConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, mlp_ratio=2, num_register_tokens=2)
        AutoModel.from_config(cfg).save_pretrained(out_dir)
    else:
        save_tiny_base(family, out_dir)
    torch.manual_seed(1)  # the new classifier head
    return AutoModelForImageClassification.from_pretrained(out_dir, num_labels=3)


def train_briefly(model: torch.nn.Module, family: str, steps: int = 40) -> None:
    h, w = input_size(family)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        x, y = synthetic_batch(16, h, w, seed=1000 + step)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> a tiny 3-label model trained briefly on the synthetic task (built on first use)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            model = load_tiny(family, tmp_path_factory.mktemp(family))
            train_briefly(model, family)
            cache[family] = model
        return cache[family]

    return get


def reference_logits(model, x):
    """What a plain forward gives (ViT needs interpolated position embeddings off its trained size)."""
    kwargs = {}
    if model.config.model_type == "vit" and tuple(x.shape[-2:]) != (model.config.image_size,) * 2:
        kwargs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        return model(pixel_values=x, **kwargs).logits


def assert_valid_maps(maps: np.ndarray, batch: int, h: int, w: int) -> None:
    assert maps.shape == (batch, h, w)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for m in maps:
        assert m.max() - m.min() > 0.1, "constant map"


def forward_hooks_everywhere(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# torchvision stand-ins
# --------------------------------------------------------------------------------------------------


def run_python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path) if extra_path else "", str(ROOT)) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_torchvision_stays_absent_in_this_process():
    from transformers.utils import import_utils, is_torchvision_available

    assert gradcam.pytorch_grad_cam.GradCAM is not None
    assert "torchvision" not in sys.modules
    assert not any(name.startswith("torchvision.") for name in sys.modules)
    assert importlib.util.find_spec("torchvision") is None
    import_utils.is_torchvision_available.cache_clear()
    assert is_torchvision_available() is False
    with pytest.raises(ModuleNotFoundError):
        import torchvision  # noqa: F401


def test_torchvision_standins_behave():
    """pytorch-grad-cam keeps references to the stand-ins; the helpers that use them still work."""
    from pytorch_grad_cam import sess
    from pytorch_grad_cam.utils import model_targets
    from pytorch_grad_cam.utils.image import preprocess_image

    img = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    out = preprocess_image(img, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    expected = (img.transpose(2, 0, 1) - np.array([0.5, 0.4, 0.3])[:, None, None]) / np.array([0.2, 0.25, 0.5])[:, None, None]
    assert out.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-6)

    iou = model_targets.torchvision.ops.box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))

    t = torch.rand(2, 3, 20, 30)
    assert sess.resize(t, 10).shape == (2, 3, 10, 15)
    assert sess.resize(t, [8, 9]).shape == (2, 3, 8, 9)


@pytest.mark.parametrize("order", ["transformers_first", "gradcam_first"])
def test_torchvision_stays_absent_in_fresh_interpreter(order):
    """In a new process, whichever is imported first, transformers keeps its PIL image backends."""
    imports = ["import modeling.gradcam", "import transformers"]
    if order == "transformers_first":
        imports.reverse()
    code = "\n".join(imports) + """
import importlib.util, sys
from transformers.utils import import_utils
assert import_utils.is_torchvision_available() is False
import_utils.is_torchvision_available.cache_clear()
assert import_utils.is_torchvision_available() is False
assert importlib.util.find_spec("torchvision") is None
assert not [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]
from transformers import DonutImageProcessor, ViTImageProcessor
assert DonutImageProcessor.__name__ == "DonutImageProcessorPil", DonutImageProcessor
assert ViTImageProcessor.__name__ == "ViTImageProcessorPil", ViTImageProcessor
import pytorch_grad_cam.utils.model_targets as mt
assert mt.torchvision.__version__.endswith("standin")
print("ok")
"""
    res = run_python(code)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_real_torchvision_is_imported_normally(tmp_path):
    """With a torchvision installed (here a minimal on-disk package), no stand-in is made."""
    pkg = tmp_path / "site" / "torchvision"
    (pkg / "transforms").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import ops, transforms\nMARK = 'installed'\n__version__ = '0.99'\n")
    (pkg / "ops.py").write_text("def box_iou(a, b):\n    raise NotImplementedError\n")
    (pkg / "transforms" / "__init__.py").write_text(
        "from . import functional\nclass Compose: pass\nclass Normalize: pass\nclass ToTensor: pass\n")
    (pkg / "transforms" / "functional.py").write_text("def resize(*a, **k):\n    raise NotImplementedError\n")
    code = """
import sys
import modeling.gradcam
import pytorch_grad_cam.utils.model_targets as mt
import torchvision
assert torchvision.MARK == "installed"
assert mt.torchvision is torchvision is sys.modules["torchvision"]
assert "torchvision.transforms.functional" in sys.modules
print("ok", torchvision.__file__)
"""
    res = run_python(code, extra_path=tmp_path / "site")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    assert str(tmp_path) in res.stdout


# --------------------------------------------------------------------------------------------------
# Families, layers, reshape
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_and_target_layer(family, trained):
    model = trained(family)
    assert model_family(model) == family
    (layer,) = target_layers(model)
    expected = {
        "vit": lambda m: m.vit.layers[-1].layernorm_before,
        # DINOv2: one block before the last (measured more faithful, benchmarks/heatmap_faithfulness.py)
        "dinov2": lambda m: m.dinov2.encoder.layer[-2].norm1,
        "dinov2_with_registers": lambda m: m.dinov2_with_registers.encoder.layer[-2].norm1,
        "convnext": lambda m: m.convnext.encoder.stages[-1],
        "convnextv2": lambda m: m.convnextv2.encoder.stages[-1],
    }[family](model)
    assert layer is expected
    assert (reshape_transform(model) is None) == (family not in TOKEN_FAMILIES)


def test_unknown_family_is_refused(tmp_path):
    from types import SimpleNamespace

    fake = torch.nn.Linear(2, 2)
    fake.config = SimpleNamespace(model_type="resnet")
    with pytest.raises(ValueError, match="supported: vit, dinov2, dinov2_with_registers, convnext, convnextv2"):
        model_family(fake)
    with pytest.raises(ValueError, match="resnet"):
        GradCam(fake)
    headless = AutoModel.from_pretrained(save_tiny_base("vit", tmp_path))
    with pytest.raises(ValueError, match="AutoModelForImageClassification"):
        target_layers(headless)


def test_reshape_transform_token_layout(trained):
    model = trained("dinov2_with_registers")  # CLS + 2 registers + patches
    c = 4
    # 32x48 input, patch 8 -> 4x6 grid; token value encodes its index
    tokens = torch.arange(3 + 24, dtype=torch.float32)[None, :, None].expand(2, -1, c)
    grid = reshape_transform(model, lambda: (32, 48))(tokens)
    assert grid.shape == (2, c, 4, 6)
    assert torch.equal(grid[0, 0], torch.arange(3, 27, dtype=torch.float32).reshape(4, 6))  # row-major, prefix dropped
    square = reshape_transform(model)(torch.zeros(1, 3 + 16, c))  # without input size: square grid
    assert square.shape == (1, c, 4, 4)
    with pytest.raises(ValueError, match="patch grid"):
        reshape_transform(model)(tokens)  # 24 patches are not square
    with pytest.raises(ValueError, match="patch grid"):
        reshape_transform(model, lambda: (32, 32))(tokens)
    vit = reshape_transform(trained("vit"), lambda: (32, 48))(torch.zeros(1, 1 + 24, c))
    assert vit.shape == (1, c, 4, 6)


def test_wrapper_returns_logits_tensor(trained):
    model = trained("vit")
    x = torch.randn(2, 3, 32, 48)
    wrapped = ClassifierLogits(model)
    with torch.no_grad():
        out = wrapped(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    assert wrapped.last_input_hw == (32, 48)
    torch.testing.assert_close(out, reference_logits(model, x))


# --------------------------------------------------------------------------------------------------
# GradCam
# --------------------------------------------------------------------------------------------------


def family_shapes():
    for family in ALL_FAMILIES:
        yield pytest.param(family, input_size(family), id=f"{family}-{input_size(family)[0]}x{input_size(family)[1]}")
        if family in TOKEN_FAMILIES:
            yield pytest.param(family, (32, 48), id=f"{family}-32x48")


@pytest.mark.parametrize("family,hw", list(family_shapes()))
def test_maps_logits_and_passes(family, hw, trained):
    model = trained(family)
    h, w = hw
    x, _ = synthetic_batch(4, h, w, seed=7)
    cam = GradCam(model)

    counts = {"forward": 0, "backward": 0}

    def count_forward(module, args, output):
        counts["forward"] += 1

    def count_backward_through_logits(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    handles = [model.register_forward_hook(count_forward),
               model.classifier.register_forward_hook(count_backward_through_logits)]
    try:
        result = cam(x)
    finally:
        for handle in handles:
            handle.remove()
    assert counts == {"forward": 1, "backward": 1}

    assert isinstance(result, CamResult)
    assert_valid_maps(result.maps, 4, h, w)
    assert result.logits.shape == (4, 3) and not result.logits.requires_grad
    torch.testing.assert_close(result.logits, reference_logits(model, x), rtol=1e-5, atol=1e-5)
    assert result.target_classes == result.logits.argmax(-1).tolist()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_target_class_changes_map(family, trained):
    model = trained(family)
    h, w = input_size(family)
    x, _ = synthetic_batch(1, h, w, seed=11)
    cam = GradCam(model)
    maps = {c: cam(x, target_classes=[c]) for c in range(3)}
    for c, res in maps.items():
        assert res.target_classes == [c]
    predicted = int(maps[0].logits.argmax())
    other = (predicted + 1) % 3
    assert_valid_maps(maps[predicted].maps, 1, h, w)
    assert not np.allclose(maps[predicted].maps, maps[other].maps, atol=1e-3)
    # same forward each time, so the logits do not depend on the class asked for
    torch.testing.assert_close(maps[0].logits, maps[2].logits)


@pytest.mark.parametrize("family", ["vit", "dinov2_with_registers", "convnext"])
def test_same_maps_as_plain_pytorch_grad_cam(family, trained):
    """Cutting the graph at the target layer and freezing parameters changes cost, not the result."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = trained(family)
    h, w = input_size(family)
    x, _ = synthetic_batch(3, h, w, seed=5)
    ours = GradCam(model)(x, target_classes=[0, 1, 2])
    wrapped = ClassifierLogits(model)
    plain = GradCAM(wrapped, target_layers(model), reshape_transform(model, wrapped.input_hw))
    try:
        reference = plain(x, [ClassifierOutputTarget(c) for c in (0, 1, 2)])
    finally:
        plain.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(ours.maps, reference, atol=1e-4)


def test_model_state_is_restored(tmp_path):
    model = load_tiny("vit", tmp_path)  # fresh, so the changes below do not leak into other tests
    model.train()
    model.vit.embeddings.patch_embeddings.projection.weight.requires_grad_(False)
    existing = torch.full_like(model.classifier.weight, 3.0)
    model.classifier.weight.grad = existing
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks_before = forward_hooks_everywhere(model)

    result = GradCam(model)(torch.randn(2, 3, 32, 32))

    assert result.maps.shape == (2, 32, 32)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.classifier.weight.grad is existing  # pytorch-grad-cam's zero_grad() undone
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    assert all(m.training for m in model.modules())
    assert forward_hooks_everywhere(model) == hooks_before


def test_hooks_released_and_flags_restored_on_error(trained):
    model = trained("dinov2")
    flags = [p.requires_grad for p in model.parameters()]
    hooks_before = forward_hooks_everywhere(model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.classifier.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            GradCam(model)(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert forward_hooks_everywhere(model) == hooks_before
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_inside_no_grad_contexts(context, trained):
    model = trained("convnextv2")
    with context():
        x, _ = synthetic_batch(2, 128, 128, seed=3)
        result = GradCam(model)(x)
    assert_valid_maps(result.maps, 2, 128, 128)


def test_invalid_arguments(trained):
    cam = GradCam(trained("vit"))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="1 target classes for a batch of 2"):
        cam(x, target_classes=[0])
    with pytest.raises(ValueError, match="out of range"):
        cam(x, target_classes=[0, 3])
    with pytest.raises(ValueError, match="channels"):
        cam(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="batch"):
        cam(torch.randn(3, 32, 32))


def test_conv_input_too_small_is_refused(trained):
    model = trained("convnext")
    with pytest.raises(ValueError, match="1x1"):
        GradCam(model)(torch.randn(1, 3, 32, 32))
    assert forward_hooks_everywhere(model) == 0


# --------------------------------------------------------------------------------------------------
# Geometry and overlay
# --------------------------------------------------------------------------------------------------


def test_cam_to_image_resize():
    cam = np.zeros((32, 32), np.float32)
    cam[:, :16] = 1.0
    out = cam_to_image(cam, (48, 30), letterbox=False)
    assert out.shape == (30, 48) and out.dtype == np.float32
    assert np.all(out[:, :22] > 0.99) and np.all(out[:, 26:] < 0.01)
    with pytest.raises(ValueError):
        cam_to_image(np.zeros((2, 32, 32)), (48, 30), letterbox=False)


def test_cam_to_image_centre_crop():
    """The map of a centre-cropped input covers the centre box of the image; the border is 0."""
    cam = np.zeros((32, 32), np.float32)
    cam[:, :16] = 1.0  # left half of what the network saw
    out = cam_to_image(cam, (100, 50), letterbox=False, crop_pct=0.8)  # box: x 10..90, y 5..45
    assert out.shape == (50, 100)
    assert out[:, :10].max() == 0 and out[:, 90:].max() == 0 and out[:5].max() == 0 and out[45:].max() == 0
    assert out[5:45, 11:48].min() > 0.99 and out[5:45, 53:90].max() < 0.01
    with pytest.raises(ValueError, match="crop_pct"):
        cam_to_image(cam, (100, 50), letterbox=False, crop_pct=0)
    with pytest.raises(ValueError, match="letterbox"):
        cam_to_image(cam, (100, 50), letterbox=True, crop_pct=0.8)


@pytest.mark.parametrize("image_wh,input_wh", [
    ((48, 30), (32, 32)),   # landscape
    ((30, 48), (32, 32)),   # portrait
    ((37, 23), (32, 32)),   # odd sizes: truncation and the odd padding pixel
    ((101, 61), (32, 32)),  # downscaled
    ((20, 20), (32, 32)),   # square, upscaled: no padding
    ((90, 40), (48, 32)),   # non-square model input
    ((40, 90), (48, 32)),
])
def test_letterbox_matches_donut_image_processor(image_wh, input_wh):
    from transformers import DonutImageProcessor

    processor = DonutImageProcessor(size={"height": input_wh[1], "width": input_wh[0]}, do_resize=True,
                                    do_thumbnail=True, do_pad=True, do_align_long_axis=False, do_normalize=False)
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 160, (image_wh[1], image_wh[0], 3), dtype=np.uint8)  # never black
    pv = processor(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
    assert pv.shape == (3, input_wh[1], input_wh[0])
    content = pv.max(axis=0) > 0

    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    left, top, w, h = letterbox_box(image_wh, input_wh)
    assert (left, top, w, h) == (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
    assert content[top : top + h, left : left + w].all()

    back = cam_to_image(content.astype(np.float32), image_wh, letterbox=True)
    assert back.shape == (image_wh[1], image_wh[0])
    assert back.min() > 0.999
    if (w, h) != input_wh:  # there is padding: ignoring it would smear zeros in
        assert cam_to_image(content.astype(np.float32), image_wh, letterbox=False).min() < 0.5


def test_letterbox_keeps_position():
    """A hot spot in the left of the content lands in the left of the original image."""
    image_wh = (60, 30)
    left, top, w, h = letterbox_box(image_wh, (32, 32))
    assert (left, top, w, h) == (0, 8, 32, 16)
    cam = np.zeros((32, 32), np.float32)
    cam[top : top + h, left : left + w // 4] = 1.0
    back = cam_to_image(cam, image_wh, letterbox=True)
    assert back[:, :13].min() > 0.99 and back[:, 17:].max() < 0.01


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "I;16", "uint8-gray", "uint8-rgb"])
def test_overlay(kind):
    h, w = 30, 48
    gray = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    image = {
        "L": Image.fromarray(gray, "L"),
        "RGB": Image.fromarray(np.stack([gray] * 3, -1), "RGB"),
        "RGBA": Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]), "RGBA"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "uint8-gray": gray,
        "uint8-rgb": np.stack([gray] * 3, -1),
    }[kind]
    cam = np.zeros((h, w), np.float32)
    cam[:, : w // 2] = 1.0
    out = overlay(image, cam, alpha=0.6)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    hot, cold = out[:, 5].astype(int), out[:, -5].astype(int)
    assert (hot[:, 0] > hot[:, 2]).all() and (cold[:, 2] > cold[:, 0]).all()  # RGB: JET red vs blue
    with pytest.raises(ValueError, match="cam_to_image"):
        overlay(image, np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, cam, alpha=1.5)


def test_overlay_end_to_end(trained):
    """Model input -> map -> original geometry -> overlay, the path the Space takes."""
    model = trained("dinov2")
    original = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 70), dtype=np.uint8), "L")
    x = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(original, np.float32) / 255)[None, None],
                                        size=(32, 32), mode="bilinear").expand(1, 3, 32, 32)
    result = GradCam(model)(x)
    cam = cam_to_image(result.maps[0], original.size, letterbox=False)
    out = overlay(original, cam)
    assert out.shape == (45, 70, 3) and out.dtype == np.uint8


# --------------------------------------------------------------------------------------------------
# The real DINOv2-small
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DINOV2_SMALL.exists(), reason=f"{DINOV2_SMALL} not found (../shared beside the checkout)")
def test_real_dinov2_small_224():
    torch.manual_seed(0)  # the random 3-label head
    model = AutoModelForImageClassification.from_pretrained(DINOV2_SMALL, num_labels=3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    img = torch.exp(-((xx - 0.3) ** 2 + yy**2) / 0.1) + 0.5 * torch.sin(6 * yy)
    x = img.expand(1, 3, 224, 224).clone()
    cam = GradCam(model)
    cam(x)  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        start = time.perf_counter()
        result = cam(x)
        elapsed = time.perf_counter() - start
        with torch.no_grad():  # for scale: the machine may be shared, so print a plain forward too
            start = time.perf_counter()
            model(pixel_values=x)
            forward = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    print(f"\nGradCam.explain on DINOv2-small, 1x3x224x224, 2 threads: {elapsed * 1000:.0f} ms "
          f"(a plain no-grad forward: {forward * 1000:.0f} ms)")
    assert_valid_maps(result.maps, 1, 224, 224)
    torch.testing.assert_close(result.logits, reference_logits(model, x), rtol=1e-4, atol=1e-4)

"""modeling/: preprocessing saved as the image processor, model building for each family, layer-wise
LR groups, temperature scaling and threshold, the predictor, and parity with transformers.pipeline."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from conftest import shared_path
from modeling.augment import AugmentConfig, augment
from modeling.calibration import (Calibration, apply_temperature, binary_rates, calibrate, choose_threshold,
                                  fit_temperature, nll)
from modeling.image_io import ImageLoadError
from modeling.labels import ID2LABEL, LABELS
from modeling.models import build_model, classifier_head, param_groups, set_backbone_trainable
from modeling.predict import Predictor
from modeling.preprocessing import (PreprocessConfig, build_image_processor, config_from_processor, crop_fraction,
                                    pixel_values)
from synthetic import sixteen_bit, xray_like
from tiny_models import FAMILIES, save_tiny_base


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: save_tiny_base(f, root / f) for f in FAMILIES}


def _saved_model(tmp_path, base, *, letterbox=False, size=32, temperature=None, crop_pct=1.0):
    model = build_model(str(base))
    if temperature:
        apply_temperature(model, temperature)
        Calibration(temperature=temperature, temperature_applied=True, pneumonia_threshold=0.4).to_config(model.config)
    processor = build_image_processor(PreprocessConfig(size=size, letterbox=letterbox, crop_pct=crop_pct))
    out = tmp_path / f"model-{'lb' if letterbox else 'rs'}-{crop_pct}"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---- preprocessing -------------------------------------------------------------------------------

@pytest.mark.parametrize("letterbox,crop_pct", [(False, 1.0), (False, 0.875), (True, 1.0)])
@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_pixel_values_are_exactly_the_processors_own(letterbox, crop_pct, resample):
    """pixel_values reduces a large film in grayscale before the processor converts it to RGB and resizes
    three channels (a 2048 px film: ~35 ms of the processor's time, benchmarks/archive.py). The tensor
    must stay exactly what the saved processor gives for the film, whatever its size, mode or kind."""
    from modeling.preprocessing import to_model_image

    proc = build_image_processor(PreprocessConfig(size=48, letterbox=letterbox, crop_pct=crop_pct, resample=resample))
    films = [xray_like(5, (640, 512)), xray_like(6, (300, 700)), xray_like(7, (48, 48)), xray_like(8, (30, 20)),
             xray_like(9, (400, 400)).convert("RGB"), sixteen_bit(xray_like(10, (256, 320)))]
    for film in films:
        want = proc([to_model_image(film)], return_tensors="pt")["pixel_values"].float()
        assert torch.equal(pixel_values(proc, [film]), want), (film.size, film.mode)
    assert torch.equal(pixel_values(proc, films[:3]),
                       torch.cat([proc([to_model_image(f)], return_tensors="pt")["pixel_values"].float()
                                  for f in films[:3]]))


def test_only_processors_that_stretch_first_get_the_grayscale_resize():
    """Another processor class may crop first, keep the aspect ratio or scale its size (Perceiver, DPT,
    PoolFormer): it gets the film as it is, whatever its size dict says."""
    from modeling.preprocessing import resize_target

    proc = build_image_processor(PreprocessConfig(size=48))
    assert resize_target(proc) == (48, 48)
    other = type("CropsFirstImageProcessor", (type(proc),), {})(**proc.to_dict())
    assert resize_target(other) is None
    film = xray_like(5, (640, 512))
    assert torch.equal(pixel_values(other, [film]), pixel_values(proc, [film]))


@pytest.mark.parametrize("letterbox,crop_pct", [(False, 1.0), (True, 1.0), (False, 0.75)])
def test_processor_round_trips_through_preprocessor_config(tmp_path, letterbox, crop_pct):
    cfg = PreprocessConfig(size=48, letterbox=letterbox, image_mean=(0.4, 0.4, 0.4), image_std=(0.2, 0.2, 0.2),
                           crop_pct=crop_pct)
    build_image_processor(cfg).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert config_from_processor(loaded) == cfg
    img = xray_like(3, (70, 50))
    assert torch.equal(pixel_values(build_image_processor(cfg), [img]), pixel_values(loaded, [img]))


def test_letterbox_pads_with_black_and_keeps_aspect_resize_stretches():
    img = Image.new("L", (100, 50), 255)  # 2:1 landscape, all white
    mean, std = 0.5, 0.25
    cfg = dict(size=40, image_mean=(mean,) * 3, image_std=(std,) * 3)
    lb = pixel_values(build_image_processor(PreprocessConfig(letterbox=True, **cfg)), [img])[0, 0]
    rs = pixel_values(build_image_processor(PreprocessConfig(letterbox=False, **cfg)), [img])[0, 0]
    black, white = (0 - mean) / std, (1 - mean) / std
    assert torch.allclose(rs, torch.full_like(rs, white))  # stretched: no padding
    content_rows = (lb > 0).any(dim=1).nonzero().flatten()
    assert len(content_rows) == 20  # 100x50 -> 40x20: aspect kept
    assert 8 <= int(content_rows[0]) <= 12  # centred
    assert torch.allclose(lb[0], torch.full_like(lb[0], black)) and torch.allclose(lb[-1], torch.full_like(lb[-1], black))


def test_centre_crop_drops_the_border_and_keeps_the_centre():
    """crop_pct 0.75 at 48 px: the image is stretched to 64 x 64 and the centre 48 x 48 kept (8 px off
    each side), so a 4 px white frame (a film's edge, markers) is gone and the inside is what it was
    (4 px clear of the frame: more than the bicubic kernel's reach)."""
    img = Image.new("L", (128, 96), 255)  # stretched to 64 x 64: the 8 px / 6 px frame becomes 4 px
    img.paste(Image.new("L", (112, 84), 100), (8, 6))
    mean, std = 0.5, 0.25
    proc = build_image_processor(PreprocessConfig(size=48, crop_pct=0.75, image_mean=(mean,) * 3, image_std=(std,) * 3))
    cropped = pixel_values(proc, [img])[0, 0]
    assert cropped.shape == (48, 48)
    assert torch.allclose(cropped, torch.full_like(cropped, (100 / 255 - mean) / std), atol=1e-2)
    whole = pixel_values(build_image_processor(PreprocessConfig(size=48, image_mean=(mean,) * 3, image_std=(std,) * 3)),
                         [img])[0, 0]
    assert whole.max() > (250 / 255 - mean) / std  # without the crop the frame is in the input
    assert crop_fraction(proc) == pytest.approx(0.75) and crop_fraction(build_image_processor(PreprocessConfig())) == 1.0


@pytest.mark.parametrize("kwargs,match", [({"crop_pct": 0.3}, "crop_pct"), ({"crop_pct": 1.2}, "crop_pct"),
                                          ({"crop_pct": 0.9, "letterbox": True}, "letterbox")])
def test_invalid_crop_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_colour_and_16bit_inputs_reach_the_model_as_the_loader_sees_them():
    gray = xray_like(5, (40, 40))
    proc = build_image_processor(PreprocessConfig(size=32))
    as_rgb = gray.convert("RGB")
    assert torch.equal(pixel_values(proc, [gray]), pixel_values(proc, [as_rgb]))
    # 16-bit: scaled min..max like modeling.image_io, not clipped like PIL's convert("L")
    deep = sixteen_bit(gray)
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    from modeling.image_io import load_image

    assert torch.equal(pixel_values(proc, [deep]), pixel_values(proc, [load_image(buf.getvalue())]))


def test_preprocess_config_rejects_bad_values():
    with pytest.raises(ValueError, match="size"):
        PreprocessConfig(size=2)
    with pytest.raises(ValueError, match="resample"):
        PreprocessConfig(resample="lanczos9")


# ---- augmentation --------------------------------------------------------------------------------

def test_augment_is_seeded_keeps_mode_and_is_mild():
    img = xray_like(1, (64, 48))
    cfg = AugmentConfig()
    a = augment(img, cfg, random.Random(7))
    b = augment(img, cfg, random.Random(7))
    c = augment(img, cfg, random.Random(8))
    assert a.mode == "L" and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.size[0] * a.size[1] >= 0.8 * 64 * 48 - 64  # crop keeps >= 80% of the area
    off = AugmentConfig(crop_scale=(1.0, 1.0), max_rotation=0, brightness=0, contrast=0, gamma=0)
    assert np.array_equal(np.asarray(augment(img, off, random.Random(0))), np.asarray(img))


# ---- models --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_has_our_labels_and_save_load_gives_identical_logits(tmp_path, tiny_bases, family):
    model = build_model(str(tiny_bases[family])).eval()
    assert model.config.num_labels == 3
    assert {int(k): v for k, v in model.config.id2label.items()} == ID2LABEL
    assert classifier_head(model).out_features == 3
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)


@pytest.mark.parametrize("family", ["vit", "dinov2", "convnext"])
def test_layerwise_lr_groups_cover_every_parameter_once(tiny_bases, family):
    model = build_model(str(tiny_bases[family]))
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, head_lr_scale=10)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    head = classifier_head(model)
    head_group = next(g for g in groups if any(p is head.weight for p in g["params"]))
    assert head_group["lr"] == pytest.approx(1e-2)
    by_layer = {g["layer_id"]: g["lr"] for g in groups if not any(p is head.weight or p is head.bias for p in g["params"])}
    layers = sorted(by_layer)
    from modeling.models import num_layers

    assert layers == list(range(num_layers(model) + 2))  # embeddings, every block/stage, final norm
    # deeper layers learn faster, by exactly the decay factor per layer (below the head)
    for a, b in zip(layers[:-2], layers[1:-1]):
        assert by_layer[b] == pytest.approx(by_layer[a] / 0.5 ** (b - a))
    bias_groups = [g for g in groups if any(p is head.bias for p in g["params"])]
    assert bias_groups[0]["weight_decay"] == 0.0


def test_freezing_the_backbone_leaves_only_the_head_trainable(tiny_bases):
    model = build_model(str(tiny_bases["dinov2"]))
    set_backbone_trainable(model, False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


# ---- calibration ---------------------------------------------------------------------------------

def _calibrated_logits(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 2.0
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    return z, y


def test_temperature_scaling_recovers_the_temperature_and_lowers_nll():
    z, y = _calibrated_logits()
    over = z * 4.0  # an overconfident model
    t = fit_temperature(over, y)
    assert t == pytest.approx(4.0, rel=0.1)
    assert nll(over, y, t) < nll(over, y) - 0.1
    under = z * 0.3
    assert fit_temperature(under, y) == pytest.approx(0.3, rel=0.1)


def test_threshold_meets_the_target_sensitivity_and_is_the_highest_that_does():
    rng = np.random.default_rng(1)
    pos = rng.random(2000) < 0.6
    p = np.clip(np.where(pos, rng.beta(5, 2, 2000), rng.beta(2, 5, 2000)), 0, 1)
    t = choose_threshold(p, pos, 0.95)
    sens, spec = binary_rates(p, pos, t)
    assert sens >= 0.95
    kth = p[pos & (p >= t)].min()  # the last positive that had to be caught
    assert binary_rates(p, pos, np.nextafter(kth, 1))[0] < 0.95  # any higher threshold misses the target
    assert p[p < kth].max() < t <= kth  # and t sits in the gap below it, off the knife's edge
    with pytest.raises(ValueError, match="no pneumonia"):
        choose_threshold(p[~pos], pos[~pos], 0.9)


def test_calibrate_bakes_temperature_into_the_head_and_stores_it(tmp_path, tiny_bases):
    model = build_model(str(tiny_bases["dinov2"])).eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        head = classifier_head(model)
        head.weight.mul_(30)  # make it overconfident
        head.bias.mul_(30)
        raw = model(pixel_values=x).logits
    y = raw.argmax(1).numpy()
    y[:20] = (y[:20] + 1) % 3  # and wrong a third of the time
    cal = calibrate(model, raw, y, target_sensitivity=0.9)
    assert cal.temperature > 1 and cal.nll_after < cal.nll_before
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, raw / cal.temperature, atol=1e-4)
    assert Calibration.from_config(loaded.config) == cal
    with pytest.raises(ValueError, match="already calibrated"):
        calibrate(loaded, raw, y)


# ---- predictor and pipeline parity ----------------------------------------------------------------

@pytest.mark.parametrize("letterbox,crop_pct", [(False, 1.0), (True, 1.0), (False, 0.8)])
@pytest.mark.parametrize("family", ["dinov2", "convnext"])
def test_pipeline_gives_the_predictors_probabilities(tmp_path, tiny_bases, family, letterbox, crop_pct):
    model_dir = _saved_model(tmp_path, tiny_bases[family], letterbox=letterbox, temperature=2.5, crop_pct=crop_pct)
    path = tmp_path / "film.png"
    xray_like(11, (60, 45)).save(path)
    ours = Predictor.from_pretrained(str(model_dir)).predict_one(path)
    clf = pipeline("image-classification", model=str(model_dir), device="cpu")
    theirs = {d["label"]: d["score"] for d in clf(str(path))}
    assert set(theirs) == set(LABELS)
    for name in LABELS:
        assert theirs[name] == pytest.approx(ours.probabilities[name], abs=1e-5)


def test_heatmap_of_a_centre_cropped_model_covers_only_what_the_network_saw(tmp_path, tiny_bases):
    model_dir = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.5, crop_pct=0.8)
    pred = Predictor.from_pretrained(str(model_dir))
    r = pred.predict_one(xray_like(4, (100, 60)), heatmap=True)
    assert r.heatmap.shape == (60, 100)
    assert r.heatmap[:, :9].max() == 0 and r.heatmap[:, -9:].max() == 0  # 10 % each side never seen
    assert r.heatmap[:5].max() == 0 and r.heatmap[-5:].max() == 0
    assert r.heatmap[7:53, 11:89].max() > 0


def test_predictor_outputs_threshold_decision_and_heatmap(tmp_path, tiny_bases):
    model_dir = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.5)
    pred = Predictor.from_pretrained(str(model_dir))
    assert pred.threshold == 0.4 and pred.calibration.temperature == 1.5
    images = [xray_like(i, (50 + 10 * i, 40)) for i in range(3)]
    out = pred.predict(images, heatmap=True, batch_size=2)
    assert len(out) == 3
    for r, im in zip(out, images):
        assert sum(r.probabilities.values()) == pytest.approx(1.0)
        assert r.pneumonia_probability == pytest.approx(r.probabilities["bacterial_pneumonia"] + r.probabilities["viral_pneumonia"])
        assert r.pneumonia == (r.pneumonia_probability >= 0.4)
        assert r.label == max(r.probabilities, key=r.probabilities.get)
        assert r.heatmap.shape == (im.size[1], im.size[0]) and np.isfinite(r.heatmap).all()
        assert r.heatmap_class == r.label
    plain = pred.predict(images)
    for a, b in zip(out, plain):  # the Grad-CAM forward gives the same probabilities
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        assert b.heatmap is None
    chosen = pred.predict_one(images[0], heatmap=True, target_class="viral_pneumonia")
    assert chosen.heatmap_class == "viral_pneumonia"
    with pytest.raises(ValueError, match="unknown class"):
        pred.predict_one(images[0], heatmap=True, target_class="covid")


def test_predictor_reads_files_bytes_and_dicom_and_rejects_bad_files(tmp_path, tiny_bases):
    model_dir = _saved_model(tmp_path, tiny_bases["convnext"])
    pred = Predictor.from_pretrained(str(model_dir))
    img = xray_like(2, (64, 64))
    path = tmp_path / "a.png"
    img.save(path)
    from_path = pred.predict_one(path)
    from_bytes = pred.predict_one(path.read_bytes())
    from_pil = pred.predict_one(img)
    assert from_path.probabilities == from_bytes.probabilities == from_pil.probabilities
    with pytest.raises(ImageLoadError) as e:
        pred.predict([path, b"not an image at all"])
    assert e.value.reason == "not_an_image"
    with pytest.raises(ImageLoadError, match="empty"):
        pred.predict_one(b"")


def test_predictor_on_the_shared_dicom_files(tmp_path, tiny_bases):
    dicom_dir = shared_path("data", "dicom")
    files = sorted(p for p in dicom_dir.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))
    if not files:
        pytest.skip(f"no DICOM files in {dicom_dir}")
    pred = Predictor.from_pretrained(str(_saved_model(tmp_path, tiny_bases["dinov2"])))
    ok = 0
    for f in files:
        try:
            r = pred.predict_one(f, heatmap=True)
        except ImageLoadError:
            continue  # the loader's own tests pin which shared files are readable
        assert math.isclose(sum(r.probabilities.values()), 1.0, rel_tol=1e-6)
        assert r.heatmap.shape[::-1] == r.image_size
        ok += 1
    assert ok >= 1


def test_predictor_refuses_a_model_with_other_labels(tmp_path, tiny_bases):
    model = AutoModelForImageClassification.from_pretrained(str(tiny_bases["dinov2"]), num_labels=2)
    with pytest.raises(ValueError, match="labels"):
        Predictor(model, build_image_processor(PreprocessConfig(size=32)))


def test_predictor_pins_the_pil_backend_used_in_training(tmp_path, tiny_bases, monkeypatch):
    """Without torchvision transformers falls back to PIL anyway, so check what is asked for."""
    asked = {}
    original = AutoImageProcessor.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", classmethod(spy))
    pred = Predictor.from_pretrained(str(_saved_model(tmp_path, tiny_bases["dinov2"])))
    assert asked.get("backend") == "pil"
    assert type(pred.processor).__name__.endswith("Pil")


def test_fine_tuning_from_a_calibrated_model_starts_with_a_fresh_uncalibrated_head(tmp_path, tiny_bases):
    released = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=3.0)
    old = AutoModelForImageClassification.from_pretrained(released)
    model = build_model(str(released))
    assert not hasattr(model.config, "cxr_calibration")
    assert not torch.equal(classifier_head(model).weight, classifier_head(old).weight)
    assert torch.count_nonzero(classifier_head(model).bias) == 0
    # the backbone is kept
    assert torch.equal(model.dinov2.embeddings.cls_token, old.dinov2.embeddings.cls_token)


def test_drop_path_rate_is_applied_where_it_exists_and_refused_where_not(tiny_bases):
    assert build_model(str(tiny_bases["dinov2"]), drop_path_rate=0.1).config.drop_path_rate == 0.1
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_model(str(tiny_bases["vit"]), drop_path_rate=0.1)


def test_stratified_subset_keeps_every_class_and_handles_edge_sizes():
    from datasets import ClassLabel, Dataset, Features, Value

    from modeling.data import groups_of, stratified_subset

    labels = [0] * 80 + [1] * 15 + [2] * 5
    ds = Dataset.from_dict({"label": labels, "x": list(range(100))},
                           features=Features({"label": ClassLabel(names=list(LABELS)), "x": Value("int64")}))
    small = stratified_subset(ds, 20, seed=0)
    assert len(small) == 20 and set(small["label"]) == {0, 1, 2}  # a plain head(20) would be all normal
    assert len(stratified_subset(ds, 99, seed=0)) == 99  # too few left over to stratify: still n rows
    assert stratified_subset(ds, None, seed=0) is ds and stratified_subset(ds, 500, seed=0) is ds
    assert groups_of(ds) is None  # no patient ids: the metrics resample images, and say so


def test_an_uncalibrated_checkpoint_of_ours_is_continued_with_its_head(tmp_path, tiny_bases):
    first = build_model(str(tiny_bases["convnext"]))
    first.save_pretrained(tmp_path / "stage1")  # what train.py writes to checkpoints/best
    again = build_model(str(tmp_path / "stage1"))
    assert torch.equal(classifier_head(again).weight, classifier_head(first).weight)
    other = AutoModelForImageClassification.from_pretrained(
        str(tiny_bases["convnext"]), num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    other.save_pretrained(tmp_path / "other")
    assert not torch.equal(classifier_head(build_model(str(tmp_path / "other"))).weight, classifier_head(other).weight)


def test_predict_cli_reports_bad_files_and_keeps_going(tmp_path, tiny_bases):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    model_dir = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.3)
    good, bad, missing = tmp_path / "good.png", tmp_path / "bad.jpeg", tmp_path / "missing.png"
    xray_like(4, (50, 40)).save(good)
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    heat = tmp_path / "heat"
    proc = subprocess.run(
        [sys.executable, "-m", "modeling", "predict", "--model", str(model_dir), "--heatmap-dir", str(heat),
         str(good), str(bad), str(missing), str(good)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 1 and "2 of 4 file(s) could not be read" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [("error" in r) for r in rows] == [False, True, True, False]
    assert rows[1]["error"]["reason"] in ("truncated", "not_an_image") and rows[2]["error"]["reason"] == "io_error"
    ours = Predictor.from_pretrained(str(model_dir)).predict_one(good)
    assert rows[0]["probabilities"] == pytest.approx(ours.probabilities) and rows[3] == {**rows[0], "file": str(good),
                                                                                          "heatmap_file": rows[3]["heatmap_file"]}
    overlay_png = Image.open(rows[0]["heatmap_file"])
    assert overlay_png.size == (50, 40) and overlay_png.mode == "RGB"


def test_predictor_bfloat16_precision_close_to_float32(tiny_bases, tmp_path) -> None:
    from modeling.predict import PRECISIONS, resolve_precision

    model_dir = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.3)
    fp32 = Predictor.from_pretrained(str(model_dir))
    bf16 = Predictor.from_pretrained(str(model_dir), precision="bfloat16")
    assert fp32.precision == "float32" and bf16.precision == "bfloat16"
    assert next(bf16._fast.parameters()).dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.float32  # the float32 model stays, for float32 callers
    images = [xray_like(s, (64, 64)) for s in range(6)]
    a = np.array([[p.probabilities[k] for k in LABELS] for p in fp32.predict(images)])
    b = np.array([[p.probabilities[k] for k in LABELS] for p in bf16.predict(images)])
    assert 0 < np.abs(a - b).max() < 0.02  # different arithmetic, same answer within the stated tolerance
    # Grad-CAM runs in the compute precision (issue 21): one pass gives the heatmap and the very
    # probabilities of a plain prediction, and the map is the float32 map within bf16 arithmetic
    for im in images[:3]:
        heat, plain, heat32 = (bf16.predict_one(im, heatmap=True), bf16.predict_one(im),
                               fp32.predict_one(im, heatmap=True))
        assert heat.probabilities == plain.probabilities
        assert np.corrcoef(heat.heatmap.ravel(), heat32.heatmap.ravel())[0, 1] > 0.98
    assert resolve_precision("auto") in PRECISIONS
    with pytest.raises(ValueError, match="precision"):
        Predictor.from_pretrained(str(model_dir), precision="float16")


def test_export_model_half_weights_float32_compute(tiny_bases, tmp_path) -> None:
    from safetensors import safe_open

    from modeling.export import export_model

    src = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.3)
    images = [xray_like(s, (64, 64)) for s in range(8)]
    summary = export_model(src, tmp_path / "release", check_images=images)
    assert summary["checked_images"] == 8 and summary["label_changes"] == 0
    assert 0 < summary["max_abs_probability_diff"] < 0.01
    with safe_open(tmp_path / "release" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "release")
    assert reloaded.dtype == torch.float32
    assert Calibration.from_config(reloaded.config).temperature == pytest.approx(1.3)
    with pytest.raises(FileExistsError):
        export_model(src, tmp_path / "release")
    with pytest.raises(ValueError, match="not calibrated"):
        export_model(_saved_model(tmp_path / "u", tiny_bases["vit"]), tmp_path / "other")


def test_calibration_cli_calibrates_a_checkpoint_for_a_new_centre_crop(tmp_path, tiny_bases, capsys):
    """``cxr-calibrate``: an uncalibrated checkpoint + a crop chosen on validation ->
    a folder whose processor has the crop and whose temperature and threshold were fit with it."""
    from modeling.cli import calibrate_main as calibration_main
    from synthetic import make_class_dataset

    data = make_class_dataset(tmp_path / "data", n_train=6, n_val=30, n_test=6)
    ckpt = _saved_model(tmp_path, tiny_bases["dinov2"])  # no calibration, full-image processor
    out = tmp_path / "calibrated"
    assert calibration_main(["--model", str(ckpt), "--dataset", str(data), "--output-dir", str(out),
                             "--crop-pct", "0.8", "--no-progress"]) == 0
    proc_cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert proc_cfg["image_processor_type"] == "DeiTImageProcessor" and proc_cfg["crop_size"]["height"] == 32

    from datasets import load_from_disk
    from modeling.evaluate import predict_logits

    val = load_from_disk(str(data))["validation"]
    raw = predict_logits(build_model(str(ckpt)), AutoImageProcessor.from_pretrained(out), val, progress=False)
    y = np.asarray(val["label"])
    pred = Predictor.from_pretrained(str(out))
    cal = pred.calibration
    assert cal.temperature_applied and cal.fitted_on == "validation" and cal.n_fit == 30
    assert cal.temperature == pytest.approx(fit_temperature(raw, y), rel=1e-4)  # fit on the *cropped* inputs
    calibrated = predict_logits(pred.model, pred.processor, val, progress=False)
    assert np.allclose(calibrated, raw / cal.temperature, atol=1e-4)
    # a calibrated folder, a non-empty output directory and the test split are refused
    with pytest.raises(ValueError, match="already calibrated"):
        calibration_main(["--model", str(out), "--dataset", str(data), "--output-dir", str(tmp_path / "again"),
                          "--no-progress"])
    with pytest.raises(FileExistsError):
        calibration_main(["--model", str(ckpt), "--dataset", str(data), "--output-dir", str(out), "--no-progress"])
    # ... and the export CLI takes it from there: float16 on disk, the crop kept, checked on validation
    from modeling.cli import export_main

    release = tmp_path / "release"
    assert export_main(["--model", str(out), "--output-dir", str(release), "--dataset", str(data)]) == 0
    assert json.loads((release / "preprocessor_config.json").read_text())["crop_size"]["height"] == 32
    shipped = Predictor.from_pretrained(str(release))
    assert shipped.model.dtype == torch.float32 and shipped.threshold == pytest.approx(cal.pneumonia_threshold)
    with pytest.raises(SystemExit):
        export_main(["--model", str(out), "--output-dir", str(tmp_path / "r2"), "--dataset", str(data),
                     "--check-split", "test"])
    assert "check the export on validation" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_pneumonia_probability_is_bacterial_plus_viral_for_a_vector_and_a_batch():
    from modeling.labels import DISPLAY_NAMES, pneumonia_probability

    assert pneumonia_probability([0.2, 0.5, 0.3]) == pytest.approx(0.8)
    assert np.allclose(pneumonia_probability(np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])), [0.1, 0.9])
    with pytest.raises(ValueError, match="3 class probabilities"):
        pneumonia_probability([0.5, 0.5])
    assert set(DISPLAY_NAMES) == set(LABELS)


def test_texture_augmentation_is_off_by_default_seeded_and_changes_texture():
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), max_rotation=0, brightness=0, contrast=0, gamma=0)
    img = xray_like(4, (96, 96))
    assert np.array_equal(np.asarray(augment(img, cfg, random.Random(1))), np.asarray(img))
    tex = AugmentConfig(crop_scale=(1.0, 1.0), max_rotation=0, brightness=0, contrast=0, gamma=0, noise=8, blur=1.0,
                        sharpen=100)
    outs = [np.asarray(augment(img, tex, random.Random(s)), dtype=np.float64) for s in range(12)]
    assert np.array_equal(outs[0], np.asarray(augment(img, tex, random.Random(0)), dtype=np.float64))
    changed = [not np.array_equal(o, np.asarray(img, dtype=np.float64)) for o in outs]
    assert 0 < sum(changed) and all(o.shape == (96, 96) for o in outs)


def _tone_only(**kw) -> AugmentConfig:
    base = dict(crop_scale=(1.0, 1.0), max_rotation=0, brightness=0, contrast=0, gamma=0)
    base.update(kw)
    return AugmentConfig(**base)


def test_gamma_range_reaches_the_batterys_gammas_and_stays_inside_it():
    """v4's tone augmentation samples gamma over 0.6-1.6 (the battery's two gamma conditions): a flat
    grey film shows each draw's gamma exactly, so the sampled range can be read off the pixels."""
    flat = Image.new("L", (16, 16), 128)
    cfg = _tone_only(gamma_range=(0.6, 1.6))
    gammas = []
    for s in range(300):
        v = float(np.asarray(augment(flat, cfg, random.Random(s))).mean())
        gammas.append(np.log(v / 255) / np.log(128 / 255))
    assert min(gammas) < 0.65 and max(gammas) > 1.5
    assert min(gammas) > 0.6 - 0.02 and max(gammas) < 1.6 + 0.02
    with pytest.raises(ValueError, match="gamma_range"):
        AugmentConfig(gamma_range=(1.2, 0.8))


def test_each_texture_change_happens_at_its_own_probability():
    img = xray_like(4, (64, 64))
    plain = np.asarray(img)

    def share_changed(cfg: AugmentConfig) -> float:
        return float(np.mean([not np.array_equal(np.asarray(augment(img, cfg, random.Random(s))), plain)
                              for s in range(200)]))

    assert share_changed(_tone_only(noise=8, noise_p=0.2)) == pytest.approx(0.2, abs=0.08)
    assert share_changed(_tone_only(noise=8, noise_p=0.0)) == 0.0
    assert share_changed(_tone_only(blur=1.0, blur_p=0.2)) == pytest.approx(0.2, abs=0.08)
    assert share_changed(_tone_only(brightness=0.3, tone_p=0.5)) == pytest.approx(0.5, abs=0.1)
    with pytest.raises(ValueError, match="noise_p"):
        AugmentConfig(noise_p=1.5)


def test_zoom_out_shrinks_the_film_onto_a_black_frame_within_the_batterys_factor():
    """v5 adds the battery's worst geometry (zoom_out_1.25: a smaller child on a wider detector) at
    or below its magnitude: the film keeps its size, its content shrinks by at most 1/1.25 and lands
    somewhere on a black frame; with zoom_out_p = 0 nothing changes."""
    img = Image.new("L", (100, 80), 200)
    cfg = _tone_only(zoom_out=1.25, zoom_out_p=1.0)
    shares, corners = [], set()
    for s in range(100):
        out = np.asarray(augment(img, cfg, random.Random(s)))
        assert out.shape == (80, 100)
        bright = out > 100
        shares.append(bright.mean())
        ys, xs = np.nonzero(bright)
        corners.add((int(xs.min()), int(ys.min())))
    assert min(shares) >= 1 / 1.25 ** 2 - 0.03 and max(shares) <= 1.0
    assert min(shares) < 0.75 and len(corners) > 10  # it reaches the battery's factor, at varied places
    never = _tone_only(zoom_out=1.25, zoom_out_p=0.0)
    assert all(np.array_equal(np.asarray(augment(img, never, random.Random(s))), np.asarray(img)) for s in range(20))
    with pytest.raises(ValueError, match="zoom_out"):
        AugmentConfig(zoom_out=0.8)


def test_jpeg_reencoding_leaves_block_artefacts_at_low_quality_and_keeps_the_mode():
    from modeling.augment import jpeg_reencode

    img = xray_like(5, (64, 64))
    low = jpeg_reencode(img, 10)
    assert low.mode == img.mode and low.size == img.size
    err_low = np.abs(np.asarray(low, float) - np.asarray(img, float)).mean()
    err_high = np.abs(np.asarray(jpeg_reencode(img, 95), float) - np.asarray(img, float)).mean()
    assert err_low > 2 * err_high
    cfg = _tone_only(jpeg_quality=30, jpeg_p=1.0)
    assert not np.array_equal(np.asarray(augment(img, cfg, random.Random(0))), np.asarray(img))
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=120)


def test_a_released_model_can_be_continued_with_its_head_and_the_temperature_divided_out(tmp_path, tiny_bases):
    released = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=3.0)
    old = AutoModelForImageClassification.from_pretrained(released)
    model = build_model(str(released), keep_calibrated_head=True)
    assert not hasattr(model.config, "cxr_calibration")
    torch.testing.assert_close(classifier_head(model).weight, classifier_head(old).weight * 3.0)
    torch.testing.assert_close(classifier_head(model).bias, classifier_head(old).bias * 3.0)


@pytest.mark.slow
def test_a_compiled_predictor_answers_as_the_eager_one(tiny_bases, tmp_path) -> None:
    """Predictor.compile(): single-film plain predictions run on a TorchInductor-compiled copy (the
    faster server path, issue 18), with the same probabilities within bf16 arithmetic and the head
    features the gate reads; batches of several films and Grad-CAM keep the eager network."""
    from modeling.gate import GATE_FILE
    from test_gate import _gate_for

    model_dir = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.3)
    _gate_for(model_dir).save(model_dir / GATE_FILE)
    p = Predictor.from_pretrained(str(model_dir), precision="bfloat16")
    images = [xray_like(s, (64, 64)) for s in range(3)]
    eager = p.predict(images, batch_size=1)
    info = p.compile()
    assert info["compiled"] is True and info["max_abs_prob_diff"] <= 0.02, info
    calls = []
    p._fast.register_forward_hook(lambda *a: calls.append(1))
    compiled = p.predict(images, batch_size=1)
    assert calls == []  # the compiled copy answered
    for a, b in zip(eager, compiled):
        assert b.probabilities == pytest.approx(a.probabilities, abs=0.02)
        assert b.gate is not None and b.gate.distance == pytest.approx(a.gate.distance, rel=0.05)
    p.predict(images[:2], batch_size=2)
    p.predict_one(images[0], heatmap=True)
    assert len(calls) == 2  # a batch of two and Grad-CAM: the eager network


def test_a_predictor_whose_compilation_fails_keeps_answering(tiny_bases, tmp_path, monkeypatch) -> None:
    model_dir = _saved_model(tmp_path, tiny_bases["dinov2"], temperature=1.3)
    p = Predictor.from_pretrained(str(model_dir), precision="bfloat16")
    before = p.predict_one(xray_like(1, (64, 64)))

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    info = p.compile()
    assert info["compiled"] is False and "no C++ compiler" in info["reason"]
    assert p.predict_one(xray_like(1, (64, 64))).probabilities == before.probabilities

    def fails_later(**kw):
        raise RuntimeError("a guard the compiled graph did not foresee")

    p._compiled = fails_later  # a compiled pass that fails at serving time: the eager network answers
    assert p.predict_one(xray_like(1, (64, 64))).probabilities == before.probabilities and p._compiled is None

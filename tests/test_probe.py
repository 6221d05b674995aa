"""Frozen features (modeling/features.py), linear probes saved as stock models (modeling/probe.py) and
WiSE-FT weight interpolation (modeling.models.interpolate_weights), on tiny random DINOv2 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from modeling.augment import AugmentConfig
from modeling.features import ViewSpec, extract, features_fn, head_inputs_and_layers, split_features
from modeling.models import build_model, interpolate_weights
from modeling.preprocessing import PreprocessConfig, build_image_processor, pixel_values
from modeling.probe import LinearHead, embed, fit_probe, probe_model
from synthetic import class_image, xray_like
from tiny_models import save_tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base("dinov2", tmp_path_factory.mktemp("probe") / "base")


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(PreprocessConfig(size=32))


def test_head_features_are_what_the_stock_head_sees_and_layer_cls_is_normalised(base, processor):
    model = build_model(str(base)).eval()
    pv = pixel_values(processor, [xray_like(i, (40, 40)) for i in range(3)])
    with torch.no_grad():
        head, layers = head_inputs_and_layers(model, pv, n_layers=2)
        out = model.dinov2(pixel_values=pv)
        logits = model(pixel_values=pv).logits
    hidden = model.config.hidden_size
    assert head.shape == (3, 2 * hidden) and layers.shape == (3, 2, hidden)
    assert torch.allclose(head, torch.cat([out.last_hidden_state[:, 0], out.last_hidden_state[:, 1:].mean(1)], 1),
                          atol=1e-6)
    assert torch.allclose(model.classifier(head), logits, atol=1e-6)
    assert torch.allclose(layers[:, -1], out.last_hidden_state[:, 0], atol=1e-5)  # last block CLS, after the norm
    assert not torch.allclose(layers[:, 0], layers[:, 1])
    rows = features_fn(model, processor, n_layers=2, precision="float32")([xray_like(0, (40, 40))])
    h, cl = split_features(rows, 2 * hidden)
    assert np.allclose(h, head[:1].numpy(), atol=1e-5) and np.allclose(cl, layers[:1].flatten(1).numpy(), atol=1e-5)


def test_extract_caches_by_chunk_resumes_and_refuses_other_settings(base, processor, tmp_path):
    model = build_model(str(base)).eval()
    images = [xray_like(i, (36, 40)) for i in range(7)]
    labels = [0, 1, 2, 0, 1, 2, 0]
    spec = ViewSpec(n_augmented=2, aug=AugmentConfig(crop_scale=(0.3, 1.0), hflip=True), seed=3)
    first = extract(model, processor, images, labels, tmp_path / "c", spec=spec, n_layers=1, precision="float32",
                    chunk=3)
    assert first["features"].shape[0] == 7 * 3 and sorted((tmp_path / "c").glob("chunk-*.npz"))[-1].name == "chunk-00002.npz"
    assert list(first["image"][:6]) == [0, 0, 0, 1, 1, 1] and list(first["view"][:3]) == [0, 1, 2]
    assert list(first["labels"]) == [labels[i] for i in first["image"]]
    plain = features_fn(model, processor, n_layers=1, precision="float32")(images[:1])[0]
    assert np.allclose(first["features"][0], plain, atol=2e-3)  # view 0 is the plain film (stored as float16)
    assert not np.allclose(first["features"][1], first["features"][2], atol=1e-2)  # two different random views
    (tmp_path / "c" / "chunk-00001.npz").unlink()  # an interrupted run: the missing chunk is recomputed
    again = extract(model, processor, images, labels, tmp_path / "c", spec=spec, n_layers=1, precision="float32",
                    chunk=3)
    assert np.array_equal(again["features"], first["features"])
    with pytest.raises(ValueError, match="other settings.*spec"):
        extract(model, processor, images, labels, tmp_path / "c", spec=ViewSpec(n_augmented=1), n_layers=1,
                precision="float32", chunk=3)


def test_a_probe_becomes_a_stock_model_whose_pipeline_gives_the_probe_logits(base, processor, tmp_path):
    model = build_model(str(base)).eval()
    images = [class_image(i % 3, i, (40, 40)) for i in range(30)]
    labels = np.array([i % 3 for i in range(30)])
    feats = features_fn(model, processor, n_layers=0, precision="float32")(images)
    head = fit_probe(feats, labels, C=10.0)
    assert (head.logits(feats).argmax(1) == labels).mean() > 0.9  # learnable synthetic classes
    saved = tmp_path / "probe"
    probe_model(str(base), head).save_pretrained(saved)
    processor.save_pretrained(saved)
    reloaded = AutoModelForImageClassification.from_pretrained(saved).eval()
    with torch.no_grad():
        got = reloaded(pixel_values=pixel_values(processor, images[:4])).logits.numpy()
    assert np.allclose(got, head.logits(feats[:4]), atol=1e-4)
    clf = pipeline("image-classification", model=str(saved), image_processor=AutoImageProcessor.from_pretrained(
        saved, backend="pil"), top_k=None)
    probs = {d["label"]: d["score"] for d in clf(images[0].convert("RGB"))}
    expected = torch.softmax(torch.as_tensor(head.logits(feats[:1])), 1)[0].numpy()
    assert np.allclose([probs[k] for k in ("normal", "bacterial_pneumonia", "viral_pneumonia")], expected, atol=1e-4)
    # a CLS-only probe is the same head with the patch half zero
    hidden = model.config.hidden_size
    cls_head = fit_probe(feats[:, :hidden], labels, C=10.0)
    full = embed(cls_head, slice(0, hidden), 2 * hidden)
    assert np.allclose(full.logits(feats), cls_head.logits(feats[:, :hidden])) and not full.weight[:, hidden:].any()
    with pytest.raises(ValueError, match="head features"):
        probe_model(str(base), cls_head)


def test_balanced_probe_predicts_the_rare_class_more_often():
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 400 + [2] * 200)
    X = rng.normal(size=(len(y), 4)) + np.eye(3)[y] @ rng.normal(size=(3, 4)) * 0.8
    plain, balanced = fit_probe(X, y, C=1.0), fit_probe(X, y, C=1.0, balanced=True)
    assert plain.weight.shape == (3, 4)
    assert (balanced.logits(X).argmax(1) == 0).sum() > 2 * (plain.logits(X).argmax(1) == 0).sum()
    # two classes present: still a 3-row head in class-id order, the absent class never predicted
    two = fit_probe(X[y > 0], y[y > 0])
    assert two.weight.shape == (3, 4) and set(two.logits(X).argmax(1)) <= {1, 2}
    assert (two.logits(X[y > 0]).argmax(1) == y[y > 0]).mean() > 0.6


def test_interpolate_weights_is_wise_ft(base):
    a, b = build_model(str(base)), build_model(str(base))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    m = build_model(str(base))
    for alpha in (0.0, 0.25, 1.0):
        interpolate_weights(m, sa, sb, alpha)
        for k, v in m.state_dict().items():
            assert torch.allclose(v, (1 - alpha) * sa[k] + alpha * sb[k], atol=1e-6), (alpha, k)
    with pytest.raises(ValueError, match="differ in parameters"):
        interpolate_weights(m, sa, {k: v for k, v in sb.items() if "classifier" not in k}, 0.5)


def test_linear_head_logits_are_affine():
    h = LinearHead(weight=np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), bias=np.array([0.0, 1.0, -1.0]))
    assert np.allclose(h.logits(np.array([[2.0, 3.0]])), [[2.0, 7.0, 4.0]])


def test_average_weights_is_a_soup_of_folders_and_epoch_checkpoints(base, tmp_path):
    from safetensors.torch import save_file

    from modeling.models import average_weights, state_dict_of

    a, b = build_model(str(base)), build_model(str(base))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(2.0)
    a.save_pretrained(tmp_path / "a")
    (tmp_path / "epoch-002").mkdir()
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(tmp_path / "epoch-002" / "model.safetensors"))
    soup = average_weights(build_model(str(base)), [tmp_path / "a", tmp_path / "epoch-002"])
    sa, sb = state_dict_of(tmp_path / "a"), state_dict_of(tmp_path / "epoch-002")
    for k, v in soup.state_dict().items():
        assert torch.allclose(v, (sa[k] + sb[k]) / 2, atol=1e-6), k

"""benchmarks/recipes.py end to end on a tiny DINOv2 and synthetic films: features -> probes -> a probe
saved as a stock model -> scored under the battery through its own forward pass (must agree with the
probe's cached-feature logits) -> WiSE-FT, an ensemble -> the table and the selection rule."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, Dinov2Config

from conftest import ROOT
from synthetic import make_class_dataset

sys.path.insert(0, str(ROOT / "benchmarks"))
import recipes  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    torch.manual_seed(0)
    base = root / "base"
    AutoModel.from_config(Dinov2Config(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4,
                                       num_attention_heads=2, mlp_ratio=2)).save_pretrained(base)
    from modeling.preprocessing import PreprocessConfig, build_image_processor

    build_image_processor(PreprocessConfig(size=32)).save_pretrained(base)
    data = make_class_dataset(root / "data", n_train=24, n_val=18, n_test=6)
    common = ["--dataset", str(data), "--base-model", str(base), "--work", str(root / "work"), "--image-size", "32",
              "--threads", "1"]
    return root, common


def run(common, *args):
    assert recipes.main([*common, *args]) == 0


def test_recipes_pipeline_from_features_to_the_selection(setup):
    root, common = setup
    work = root / "work"
    run(common, "features", "--views", "2", "--chunk", "10")
    meta = json.loads((work / "features" / "train" / "meta.json").read_text())
    assert meta["n_images"] == 24 and meta["spec"]["n_augmented"] == 2 and meta["spec"]["aug"]["hflip"]
    run(common, "probes", "--C", "1.0")
    probes = sorted(p.stem for p in (work / "logits").glob("probe*.json"))
    assert len(probes) == 3 * 2 * 2  # feature sets x views x class weights
    lineval = json.loads((work / "logits" / "probe_lineval_aug_balanced_C=1_.json").read_text())
    assert lineval["single_pass"] is False and lineval["train_rows"] == 48  # 2 augmented views of 24 films

    # the stock-head probe, saved as a model and scored through its own forward pass, gives the logits
    # the probe gave on cached features (both bf16: agreement to bf16 precision)
    name = "probe[cls+patch,aug,balanced,C=1]"
    run(common, "save-probe", "--name", name, "--output-dir", str(root / "probe-model"))
    run(common, "score", "--name", "probe-as-model", "--model", str(root / "probe-model"))
    cached = np.load(work / "logits" / f"{recipes.safe(name)}.npz")
    forward = np.load(work / "logits" / "probe-as-model.npz")
    for cond in cached.files:
        assert np.allclose(cached[cond], forward[cond], atol=0.15), cond
        assert (cached[cond].argmax(1) == forward[cond].argmax(1)).mean() > 0.8, cond

    # WiSE-FT between the probe model and a "fine-tuned" copy; alpha 0 is the probe itself
    from transformers import AutoModelForImageClassification

    ft = AutoModelForImageClassification.from_pretrained(root / "probe-model")
    with torch.no_grad():
        for p in ft.dinov2.encoder.parameters():
            p.mul_(1.05)
    ft.save_pretrained(root / "ft")
    (root / "ft" / "preprocessor_config.json").write_text((root / "probe-model" / "preprocessor_config.json").read_text())
    run(common, "wise", "--name", "wise", "--start", str(root / "probe-model"), "--end", str(root / "ft"),
        "--alphas", "0", "0.5")
    w0 = np.load(work / "logits" / "wise_alpha=0_.npz")
    assert all(np.allclose(w0[c], forward[c], atol=1e-5) for c in forward.files)
    run(common, "ensemble", "--name", "ens", "--members", "probe-as-model", "wise[alpha=0.5]")

    out = root / "recipes.json"
    run(common, "table", "--output", str(out))
    table = json.loads(out.read_text())
    assert len(table["candidates"]) == 12 + 1 + 2 + 1 and table["n"] == 18
    chosen = table["candidates"][table["decision"]["chosen"]]
    assert chosen["selection"]["eligible"] and chosen["meta"]["single_pass"]
    assert not table["candidates"]["ens"]["selection"]["eligible"]
    assert list(chosen["conditions"])[0] == "plain" and "worst_macro_f1" in chosen["summary"]
    assert [c["name"] for c in table["battery"]][0] == "gamma_0.6"

    # the v4 rule: the battery operating point (its threshold holds 97% sensitivity under every
    # condition) and the objective that weighs worst-case specificity beside worst-case macro-F1
    out4 = root / "recipes_v4.json"
    run(common, "table", "--rule", "v4", "--output", str(out4))
    v4 = json.loads(out4.read_text())
    assert v4["decision"]["objective"] == "worst_f1_and_specificity" and "pooled" in v4["operating_point"]
    for name, row in v4["candidates"].items():
        assert row["operating_point"] != table["candidates"][name]["operating_point"]
        s = row["summary"]
        assert row["selection"]["objective"] == pytest.approx((s["worst_macro_f1"] + s["worst_specificity"]) / 2)
        assert row["summary"]["worst_sensitivity"] >= 0.97 - 1e-9


def test_the_table_copies_the_rule_it_applied():
    """`table --rule v4` copied training_runs.json's `selection_rule_v4`, a key since renamed, so the v5 and v6
    tables hold a null rule; and `--rule v3` would copy v4's text, now under `selection_rule`. Each rule's
    text comes from where the release file keeps it."""
    runs = json.loads((ROOT / "space" / "model" / "training_runs.json").read_text())
    assert recipes.rule_text(runs, "v4") == runs["selection_rule"] and runs["selection_rule"]
    assert recipes.rule_text(runs, "v3") == runs["history"]["v3_release"]["selection_rule"]
    assert recipes.rule_text(runs, "v3") != recipes.rule_text(runs, "v4")

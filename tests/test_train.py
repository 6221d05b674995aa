"""train.py end to end (as a user runs it: a subprocess), resume, learning, the evaluation CLI and the
push to the local Hub-compatible server; tiny random-weight bases and synthetic images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from hub_server import run_python_json
from synthetic import make_class_dataset, xray_like
from tiny_models import save_tiny_base


def run_train(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def common(dataset: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--base-model", str(base), "--output-dir", str(out), "--image-size", "32",
            "--batch-size", "16", "--learning-rate", "2e-3", "--n-bootstrap", "20", "--no-progress", *extra]


def close(a, b, tol: float = 1e-6) -> bool:
    """Recursive approximate equality for JSON-like values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, abs=tol)
    return a == b


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "dataset": make_class_dataset(root / "ds", n_train=90, n_val=30, n_test=30),
        **{f: save_tiny_base(f, root / f"base-{f}") for f in ("dinov2", "vit", "convnext")},
        "root": root,
    }


@pytest.fixture(scope="module")
def dinov2_run(data):
    out = data["root"] / "run-dinov2"
    run_train(*common(data["dataset"], data["dinov2"], out, "--epochs", "3", "--early-stopping-patience", "0"))
    return out


def test_train_writes_a_complete_calibrated_model_directory(dinov2_run):
    out = dinov2_run
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json",
                 "train_log.jsonl", "training_config.json", "eval_test/metrics.json", "eval_test/predictions.csv",
                 "eval_test/plots/confusion_matrix.png", "eval_test/plots/roc.png", "eval_test/plots/reliability.png"):
        assert (out / name).is_file(), name
    # checkpoints: the last two epochs (save_total_limit 2) and the best epoch
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch-002", "epoch-003"]
    lines = log(out)
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all(r["train_images_per_second"] > 0 and "macro_f1" in r["val"] for r in lines)

    cfg = json.loads((out / "config.json").read_text())
    cal = cfg["cxr_calibration"]
    assert cal["temperature_applied"] and cal["fitted_on"] == "validation" and cal["n_fit"] == 30
    assert cal["fit_sensitivity"] >= 0.985
    assert cfg["id2label"] == {"0": "normal", "1": "bacterial_pneumonia", "2": "viral_pneumonia"}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 30 and metrics["validation"]["n"] == 30
    best = max(lines, key=lambda r: r["val"]["macro_f1"])
    assert metrics["training"]["best_epoch"] == best["epoch"]
    # temperature scaling does not change the argmax: calibrated validation accuracy == best epoch's
    assert metrics["validation"]["accuracy"] == pytest.approx(best["val"]["accuracy"])
    assert metrics["validation"]["nll"] <= best["val"]["nll"] + 1e-6
    assert "accuracy" in metrics["test"]["ci"]
    # the metric module, recomputing on validation, agrees with the threshold fit
    assert metrics["validation"]["binary"]["sensitivity"] == pytest.approx(cal["fit_sensitivity"])
    assert metrics["validation"]["binary"]["specificity"] == pytest.approx(cal["fit_specificity"])

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "pipeline_tag: image-classification" in card
    assert "Not a medical device" in card and "## Limitations" in card
    assert f"{metrics['test']['accuracy']:.4f}" in card  # the card shows the measured number
    assert "test split was evaluated once" in card and "\npython train.py --dataset" in card


def test_evaluate_cli_reproduces_the_training_test_metrics(dinov2_run, data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "modeling", "evaluate", "--model", str(dinov2_run), "--dataset", str(data["dataset"]),
         "--split", "test", "--output-dir", str(tmp_path / "ev"), "--n-bootstrap", "20", "--seed", "42",
         "--no-progress"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "macro F1" in proc.stdout
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    trained = json.loads((dinov2_run / "metrics.json").read_text())["test"]
    for key in ("accuracy", "macro_f1", "auc_ovr_macro", "ece", "brier", "confusion_matrix", "binary", "ci"):
        assert close(again[key], trained[key]), key


def test_pipeline_loads_the_trained_directory(dinov2_run, tmp_path):
    from transformers import pipeline

    from modeling.predict import Predictor

    path = tmp_path / "x.png"
    xray_like(99, (40, 52)).save(path)
    scores = {d["label"]: d["score"] for d in pipeline("image-classification", model=str(dinov2_run))(str(path))}
    ours = Predictor.from_pretrained(str(dinov2_run)).predict_one(path)
    assert scores == pytest.approx(ours.probabilities, abs=1e-5)


def test_resume_continues_exactly_where_an_interrupted_run_stopped(dinov2_run, data, tmp_path):
    """Simulate a crash after epoch 2 of the 3-epoch run: copy its output, drop epoch 3 and the final
    files, resume. The resumed epoch 3 must equal the uninterrupted one (same data order, RNG,
    optimizer and scheduler state)."""
    out = tmp_path / "crashed"
    shutil.copytree(dinov2_run, out)
    shutil.rmtree(out / "checkpoints" / "epoch-003")
    for f in ("model.safetensors", "metrics.json", "README.md"):
        (out / f).unlink()
    lines = (out / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text("\n".join(lines[:2]) + "\n")
    run_train(*common(data["dataset"], data["dinov2"], out, "--epochs", "3", "--early-stopping-patience", "0",
                      "--resume"))
    resumed, original = log(out), log(dinov2_run)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[2]["train_loss"] == pytest.approx(original[2]["train_loss"], rel=1e-6)
    assert resumed[2]["val"] == pytest.approx(original[2]["val"], rel=1e-6)
    # the epoch-3 state itself (weights and optimizer moments), not only the best/ copy
    a = load_file(str(out / "checkpoints" / "epoch-003" / "model.safetensors"))
    b = load_file(str(dinov2_run / "checkpoints" / "epoch-003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(out / "checkpoints" / "epoch-003" / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(dinov2_run / "checkpoints" / "epoch-003" / "optimizer.bin", weights_only=False)["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(dinov2_run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(data, tmp_path):
    proc = run_train(*common(data["dataset"], data["dinov2"], tmp_path / "o", "--epochs", "1", "--resume",
                             "--max-train-samples", "20", "--max-eval-samples", "12"))
    assert "no checkpoint" in proc.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 12 and metrics["test"]["subset"] is True
    assert "not a result" in (tmp_path / "o" / "README.md").read_text()


def test_loss_falls_and_the_model_learns_a_learnable_task(data, tmp_path):
    out = tmp_path / "learn"
    run_train(*common(data["dataset"], data["dinov2"], out, "--epochs", "8", "--early-stopping-patience", "0",
                      "--no-test"))
    lines = log(out)
    first, last = lines[0]["train_loss"], (lines[-1]["train_loss"] + lines[-2]["train_loss"]) / 2
    assert last < 0.75 * first, [r["train_loss"] for r in lines]
    assert max(r["val"]["accuracy"] for r in lines) >= 0.6  # chance is 1/3
    assert "test" not in json.loads((out / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    assert "test split was not evaluated" in card and "model-index" not in card


@pytest.mark.parametrize("family,extra", [
    ("vit", ["--loss", "focal", "--mixup-alpha", "0.4", "--freeze-backbone-epochs", "1", "--crop-pct", "0.8"]),
    ("convnext", ["--letterbox", "--gradient-accumulation-steps", "2", "--mixed-precision", "no", "--num-workers", "1"]),
])
def test_other_families_and_options_train_end_to_end(data, tmp_path, family, extra):
    out = tmp_path / family
    run_train(*common(data["dataset"], data[family], out, "--epochs", "2", *extra))
    lines = log(out)
    assert len(lines) == 2
    if "--freeze-backbone-epochs" in extra:
        assert lines[0]["backbone_frozen"] and not lines[1]["backbone_frozen"]
    accumulation = 2 if "--gradient-accumulation-steps" in extra else 1
    batches = 90 // 16  # drop_last
    assert lines[-1]["global_step"] == 2 * -(-batches // accumulation)  # optimizer updates, not batches
    assert lines[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine schedule ends exactly at the end
    proc_cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert proc_cfg["image_processor_type"] == ("DonutImageProcessor" if "--letterbox" in extra else
                                                "DeiTImageProcessor" if "--crop-pct" in extra else "ViTImageProcessor")
    if "--crop-pct" in extra:  # the evaluation centre crop is saved with the model: 40 px resized, 32 px kept
        assert proc_cfg["size"] == {"height": 40, "width": 40} and proc_cfg["crop_size"] == {"height": 32, "width": 32}
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] == 30


def test_vit_at_another_input_size_is_refused_with_a_reason(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = common(data["dataset"], data["vit"], tmp_path / "o", "--epochs", "1")
    args[args.index("--image-size") + 1] = "48"
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "--image-size 32" in proc.stderr


def test_push_to_hub_then_load_by_repo_id(data, hub, tmp_path):
    server, env = hub
    out = tmp_path / "pushed"
    run_train(*common(data["dataset"], data["convnext"], out, "--epochs", "1", "--push-to-hub", "test-user/cxr-tiny"),
              env=env)
    image = tmp_path / "x.png"
    xray_like(5, (48, 40)).save(image)
    local = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k == "cxr_calibration"}
    got = run_python_json(f"""
import json
from huggingface_hub import list_repo_files
from transformers import pipeline
from modeling.predict import Predictor
files = sorted(list_repo_files("test-user/cxr-tiny"))
p = Predictor.from_pretrained("test-user/cxr-tiny")
r = p.predict_one({str(image)!r})
pipe = {{d["label"]: d["score"] for d in pipeline("image-classification", model="test-user/cxr-tiny")({str(image)!r})}}
print(json.dumps({{"files": files, "probs": r.probabilities, "pipe": pipe, "threshold": p.threshold,
                   "cal": p.model.config.cxr_calibration, "revision": p.revision}}))
""", {**env, "HF_HOME": str(tmp_path / "fresh-home"), "PYTHONPATH": str(ROOT)})
    assert "model.safetensors" in got["files"] and "preprocessor_config.json" in got["files"]
    assert "README.md" in got["files"] and "metrics.json" in got["files"]
    assert not any(f.startswith("checkpoints/") for f in got["files"])
    assert got["cal"] == local["cxr_calibration"] and got["threshold"] == local["cxr_calibration"]["pneumonia_threshold"]
    assert got["pipe"] == pytest.approx(got["probs"], abs=1e-5)
    # the commit the files came from (for the Space's prediction records): a 40-hex git oid
    assert len(got["revision"]) == 40 and int(got["revision"], 16) >= 0


def test_distributed_data_parallel_on_two_cpu_processes(data, tmp_path):
    """What `accelerate launch` does on several GPUs, on two CPU processes (gloo): one log line per
    epoch, every validation/test image counted once (gather_for_metrics drops the padding), and the
    frozen-then-unfrozen backbone works under DDP."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         *common(data["dataset"], data["dinov2"], out, "--epochs", "2", "--freeze-backbone-epochs", "1",
                 "--max-eval-samples", "29")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2
    lines = log(out)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["val"]["n"] for r in lines] == [29, 29]  # gathered over both ranks, padding dropped
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"]["n"] == 29 and metrics["test"]["n"] == 29


def test_a_new_run_refuses_an_earlier_runs_directory(dinov2_run, data, tmp_path):
    out = tmp_path / "reused"
    shutil.copytree(dinov2_run, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = common(data["dataset"], data["dinov2"], out, "--epochs", "1")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "--overwrite-output-dir" in proc.stderr
    (out / "checkpoints").rename(out / "old-checkpoints")  # a finished model alone also counts as a run
    (out / "train_log.jsonl").unlink()
    proc = subprocess.run([sys.executable, "train.py", *args, "--no-test"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "metrics.json" in proc.stderr
    run_train(*args, "--overwrite-output-dir", "--no-test")
    assert [r["epoch"] for r in log(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch-001"]
    assert not (out / "eval_test").exists()  # nothing of the earlier run is left to be pushed with this one
    assert "test" not in json.loads((out / "metrics.json").read_text())


def test_resume_of_a_finished_run_does_nothing_and_other_settings_are_refused(dinov2_run, data, tmp_path):
    out = tmp_path / "finished"
    shutil.copytree(dinov2_run, out)
    before = (out / "metrics.json").read_text()
    args = common(data["dataset"], data["dinov2"], out, "--epochs", "3", "--early-stopping-patience", "0", "--resume")
    proc = run_train(*args)
    assert "already finished" in proc.stderr
    assert (out / "metrics.json").read_text() == before  # the test split was not evaluated again
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    other = list(args)
    other[other.index("--learning-rate") + 1] = "1e-4"
    proc = subprocess.run([sys.executable, "train.py", *other], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "learning_rate" in proc.stderr


def test_early_stopping_stops_after_patience_epochs_without_gain(data, tmp_path):
    out = tmp_path / "early"
    args = common(data["dataset"], data["dinov2"], out, "--epochs", "6", "--early-stopping-patience", "2", "--no-test")
    args[args.index("--learning-rate") + 1] = "0"  # nothing changes, so nothing improves after epoch 1
    run_train(*args)
    lines = log(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in lines] == [1, 2, 3]  # best epoch 1, then 2 epochs without gain
    assert metrics["training"]["best_epoch"] == 1 and metrics["training"]["stopped_early"] is True


def test_loss_function_matches_torch_reference_losses():
    import torch.nn.functional as F

    import train

    torch.manual_seed(0)
    logits, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    w = train.class_weights([0, 0, 0, 0, 1, 1, 2])
    assert w.tolist() == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    cfg = train.TrainConfig(dataset="d", base_model="b", output_dir="o")
    assert train.loss_fn(logits, y, cfg, w) == pytest.approx(F.cross_entropy(logits, y, weight=w).item())
    assert train.loss_fn(logits, y, cfg, None) == pytest.approx(F.cross_entropy(logits, y).item())
    y2, lam = torch.randint(0, 3, (12,)), 0.3
    soft = lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y2, 3).float()
    mixed = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y2)
    assert train.loss_fn(logits, soft, cfg, None) == pytest.approx(mixed.item(), rel=1e-5)
    focal0 = train.TrainConfig(dataset="d", base_model="b", output_dir="o", loss="focal", focal_gamma=0.0)
    assert train.loss_fn(logits, y, focal0, None) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    focal = train.TrainConfig(dataset="d", base_model="b", output_dir="o", loss="focal", focal_gamma=2.0)
    assert train.loss_fn(logits, y, focal, None) < F.cross_entropy(logits, y).item()  # easy examples count less
    smooth = train.TrainConfig(dataset="d", base_model="b", output_dir="o", label_smoothing=0.1)
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert train.loss_fn(logits, y, smooth, None) == pytest.approx(ref.item(), rel=1e-5)


def test_ema_weights_are_what_is_validated_and_saved(data, tmp_path):
    out = tmp_path / "ema"
    run_train(*common(data["dataset"], data["dinov2"], out, "--epochs", "2", "--ema-decay", "0.9", "--no-test",
                      "--early-stopping-patience", "0"))
    best_epoch = json.loads((out / "checkpoints" / "best" / "best_epoch.json").read_text())["epoch"]
    ckpt = out / "checkpoints" / f"epoch-{best_epoch:03d}"
    best = load_file(str(out / "checkpoints" / "best" / "model.safetensors"))
    raw = load_file(str(ckpt / "model.safetensors"))
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    key = "dinov2.embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(best[key], raw[key])  # not the raw weights of that epoch...
    assert torch.equal(best[key], ema[f"module.{key}"])  # ...but their moving average
    assert int(ema["n_averaged"]) == json.loads((ckpt / "trainer_state.json").read_text())["global_step"]


def test_anchor_crop_settings_reach_the_augmentation():
    """--crop-scale-min/--crop-ratio-min/--crop-ratio-max are the RandomResizedCrop of the anchor recipe
    (scale 0.08-1, ratio 3/4-4/3): the crops they produce are that small and that far from square."""
    import random

    from train import TrainConfig
    from modeling.augment import augment

    cfg = TrainConfig(dataset="d", base_model="b", output_dir="o", crop_scale_min=0.08, crop_ratio_min=0.75,
                      crop_ratio_max=4 / 3, max_rotation=0, brightness=0, contrast=0, hflip=True)
    aug = cfg.augment_config()
    assert aug.crop_scale == (0.08, 1.0) and aug.crop_ratio == (0.75, 4 / 3) and aug.hflip
    img = xray_like(3, (200, 200))
    sizes = [augment(img, aug, random.Random(i)).size for i in range(200)]
    areas = [w * h / 200 ** 2 for w, h in sizes]
    ratios = [w / h for w, h in sizes]
    assert min(areas) < 0.2 and max(areas) > 0.8
    assert min(ratios) < 0.85 and max(ratios) > 1.18 and all(0.7 < r < 1.4 for r in ratios)


@pytest.mark.parametrize("metric", ["robust_worst_macro_f1", "nll"])
def test_selection_metric_picks_the_best_epoch_it_names(data, tmp_path, metric):
    """--robustness logs the battery summary every epoch; --selection-metric chooses the saved epoch by
    that number (worst-case battery macro-F1, or the lowest validation NLL) instead of plain macro-F1."""
    out = tmp_path / metric
    run_train(*common(data["dataset"], data["dinov2"], out, "--epochs", "3", "--early-stopping-patience", "0",
                      "--no-test", "--robustness", "--selection-metric", metric))
    lines = log(out)
    assert all(set(r["robustness"]) >= {"worst_macro_f1", "mean_specificity", "worst_condition_macro_f1"}
               for r in lines)
    value = ([r["robustness"]["worst_macro_f1"] for r in lines] if metric != "nll"
             else [-r["val"]["nll"] for r in lines])
    best = json.loads((out / "checkpoints" / "best" / "best_epoch.json").read_text())["epoch"]
    assert best == int(np.argmax(value)) + 1  # first of the best on ties, as np.argmax
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert training["selection_metric"] == metric and training["best_selection_value"] == pytest.approx(max(value))


def test_robust_selection_without_the_battery_is_refused_before_training(data, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *common(data["dataset"], data["dinov2"], tmp_path / "x",
                                                               "--selection-metric", "robust_worst_macro_f1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs --robustness" in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_train_api_raises_a_value_error_and_the_cli_exits_2(data, tmp_path):
    """Helpers used to raise SystemExit, which slips past `except Exception` in a Python caller."""
    import train

    cfg = train.TrainConfig(dataset=str(data["dataset"]), base_model=str(data["dinov2"]), output_dir=str(tmp_path / "o"),
                            selection_metric="robust_worst_macro_f1")
    with pytest.raises(ValueError, match="needs --robustness") as err:
        train.train(cfg)
    assert isinstance(err.value, train.TrainError)
    proc = subprocess.run([sys.executable, "train.py", *common(data["dataset"], data["vit"], tmp_path / "v",
                                                               "--image-size", "48")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "train.py: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_distillation_loss_is_hintons_kl_scaled_by_tau_squared():
    import torch.nn.functional as F

    from modeling.distill import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(8, 3), torch.softmax(torch.randn(8, 3), dim=-1)
    ref = F.kl_div(F.log_softmax(student / 2, dim=-1), teacher, reduction="batchmean") * 4
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(ref.item(), rel=1e-6)
    assert distillation_loss(student, torch.softmax(student / 2, dim=-1), 2.0).item() == pytest.approx(0, abs=1e-6)


def _viral_teacher(path: Path) -> Path:
    """A calibrated tiny classifier that calls every film viral, whatever it shows."""
    from transformers import AutoModelForImageClassification

    from tiny_models import save_tiny_classifier

    save_tiny_classifier(path, temperature=1.0)
    model = AutoModelForImageClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 8.0]))
    model.save_pretrained(path)
    return path


def _share_called(out: Path, dataset: Path, label: int) -> float:
    from datasets import load_from_disk
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from modeling.preprocessing import pixel_values

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    images = [im.convert("L") for im in load_from_disk(str(dataset))["validation"]["image"]]
    with torch.no_grad():
        calls = model(pixel_values=pixel_values(processor, images)).logits.argmax(-1)
    return float((calls == label).float().mean())


def test_a_student_learns_what_its_teachers_say(data, tmp_path):
    """--teachers: the student also learns the teachers' averaged probabilities on the same augmented
    view (knowledge distillation). A teacher that calls everything viral, at --distill-alpha 1, makes a
    student that calls (nearly) everything viral; without the teacher the same run does not."""
    teacher = _viral_teacher(tmp_path / "teacher")
    taught, plain = tmp_path / "taught", tmp_path / "plain"
    extra = ("--epochs", "2", "--no-test", "--early-stopping-patience", "0")
    run_train(*common(data["dataset"], data["dinov2"], taught, *extra, "--teachers", str(teacher),
                      "--distill-alpha", "1", "--distill-temperature", "1"))
    run_train(*common(data["dataset"], data["dinov2"], plain, *extra))
    assert _share_called(taught, data["dataset"], 2) >= 0.9
    assert _share_called(plain, data["dataset"], 2) < 0.9
    info = json.loads((taught / "training_config.json").read_text())
    assert info["config"]["teachers"] == [str(teacher)] and info["config"]["distill_alpha"] == 1.0
    assert all("distill_loss" in r for r in log(taught)) and not any("distill_loss" in r for r in log(plain))


def test_teachers_that_see_other_pixels_or_labels_are_refused_before_training(data, tmp_path):
    from tiny_models import save_tiny_classifier

    wide = save_tiny_classifier(tmp_path / "wide", image_size=48)
    for teacher, reason in ((wide, "sees other pixels"), (data["dinov2"], "labels")):
        out = tmp_path / f"out-{teacher.name}"
        proc = subprocess.run([sys.executable, "train.py", *common(data["dataset"], data["dinov2"], out,
                                                                   "--teachers", str(teacher))],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr[-2000:]
        assert not (out / "checkpoints").exists()


def test_resuming_an_older_run_with_a_setting_it_predates_is_refused(tmp_path, monkeypatch):
    """A checkpoint written before a field existed was trained with that field's default: resuming it
    with --teachers would start distilling mid-run. The teachers' folders may be written another way."""
    from dataclasses import asdict

    import train

    cfg = train.TrainConfig(dataset="d", base_model="b", output_dir="o")
    older = {k: v for k, v in asdict(cfg).items() if k not in ("teachers", "distill_alpha")}
    train.check_resume_config(cfg, older)  # nothing new: fine
    with pytest.raises(train.TrainError, match="teachers"):
        train.check_resume_config(train.TrainConfig(dataset="d", base_model="b", output_dir="o", teachers=["t"]), older)
    (tmp_path / "t").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = asdict(train.TrainConfig(dataset="d", base_model="b", output_dir="o", teachers=["t"]))
    train.check_resume_config(train.TrainConfig(dataset="d", base_model="b", output_dir="o",
                                                teachers=[str(tmp_path / "t")]), saved)

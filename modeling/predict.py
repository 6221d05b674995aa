"""Prediction: load a saved model (Hub id or directory) and classify chest X-rays.

One object, used by the Space, the evaluation CLI and developers::

    from modeling.predict import Predictor
    predictor = Predictor.from_pretrained("space/model")            # or a Hub id
    [pred] = predictor.predict(["film.dcm"], heatmap=True)
    pred.probabilities, pred.pneumonia_probability, pred.pneumonia, pred.heatmap

The probabilities are calibrated because the temperature is baked into the saved head (see
:mod:`modeling.calibration`); the pneumonia decision uses the threshold stored in the config. Images
go through :mod:`modeling.image_io` (so DICOM, 16-bit PNG... are read the same way everywhere) and
the model's own saved image processor (:mod:`modeling.preprocessing`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from .calibration import Calibration
from .decision import DECISIONS, decide, default_uncertain_high  # noqa: F401 (re-exported: the Space imports them here)
from .gate import GateVerdict, InputGate, load_gate
from .image_io import load_image, to_grayscale
from .labels import LABELS, pneumonia_probability
from .models import classifier_head
from .preprocessing import crop_fraction, is_letterbox, pixel_values
from .scope import ScopeCheck, ScopeVerdict, load_scope

ImageInput = Image.Image | str | os.PathLike | bytes | bytearray | io.IOBase


@dataclass
class Prediction:
    """One image's result. ``heatmap`` (when asked for) is an (H, W) float32 map in [0, 1] in the
    geometry of the input image, for class ``heatmap_class``. A film the scope check flags
    (:mod:`modeling.scope`: not like the pediatric films the model was trained on) gets no answer:
    ``label`` and ``pneumonia`` are None, and ``probabilities`` are kept only as the model's
    unreliable output."""

    label: str | None
    probabilities: dict[str, float]
    pneumonia_probability: float
    pneumonia: bool | None
    threshold: float
    image_size: tuple[int, int]
    heatmap: np.ndarray | None = field(default=None, repr=False)
    heatmap_class: str | None = None
    gate: GateVerdict | None = None  # the learned input gate's verdict, when the model has one
    scope: ScopeVerdict | None = None  # the scope check's verdict, when the model has one

    @property
    def out_of_scope(self) -> bool:
        return self.scope is not None and self.scope.out_of_scope

    def with_checks(self, gate: GateVerdict | None, scope: ScopeVerdict | None) -> "Prediction":
        """This prediction with the gate's and the scope check's verdicts of another pass (the Space decides
        on its plain pass and computes the heatmap in a second one): the label and the call follow that
        scope verdict, not the one the second pass's own features gave."""
        import dataclasses

        answered = scope is None or not scope.out_of_scope
        p = np.array([self.probabilities[k] for k in LABELS])
        return dataclasses.replace(self, gate=gate, scope=scope,
                                   label=LABELS[int(p.argmax())] if answered else None,
                                   pneumonia=(self.pneumonia_probability >= self.threshold) if answered else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no heatmap array)."""
        return {
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "pneumonia_probability": self.pneumonia_probability,
            "pneumonia": self.pneumonia,
            "threshold": self.threshold,
            "image_size": list(self.image_size),
            "heatmap_class": self.heatmap_class,
            "gate": None if self.gate is None else self.gate.to_dict(),
            "scope": None if self.scope is None else self.scope.to_dict(),
            "out_of_scope": self.out_of_scope,
        }


def resolve_revision(model_id_or_dir: str, revision: str | None = None) -> str:
    """What exactly was loaded, for prediction records: the Hub commit hash of a Hub model (read
    from the local snapshot path, so it also works offline from the cache), or ``sha256:<16 hex>``
    of the weights file for a local directory (a directory has no commit, but its content does)."""
    path = Path(model_id_or_dir)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        digest = hashlib.sha256()
        for w in weights:
            with open(w, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()[:16]
    from huggingface_hub import hf_hub_download

    config_path = Path(hf_hub_download(model_id_or_dir, "config.json", revision=revision))
    return config_path.parent.name  # .../snapshots/<commit>/config.json


logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "auto")
BACKENDS = ("torch", "onnx", "auto")


def bf16_fast() -> bool:
    """True when this CPU has native bfloat16 matmuls (AVX512-BF16 or AMX). Elsewhere bf16 is
    emulated and slower than float32, so ``precision="auto"`` falls back to float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: absent in some builds
        return False


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if bf16_fast() else "float32"
    return precision


def _as_gray(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_grayscale(image)
    return load_image(image)


class Predictor:
    """A calibrated classifier with optional Grad-CAM. Build with :meth:`from_pretrained`."""

    def __init__(self, model, processor, *, model_id: str | None = None, revision: str | None = None,
                 precision: str = "float32", gate: InputGate | None = None, scope: ScopeCheck | None = None,
                 onnx_session=None, keep_torch_fast_path: bool = False) -> None:
        self.model = model.eval()
        self.gate = gate
        self.scope = scope
        # float32 reproduces the model card's numbers exactly; "bfloat16" runs plain predictions on
        # a bf16 copy of the weights: faster on CPUs with native bf16, probabilities change by a few
        # 1e-3 (benchmarks/latency.py measures both). A copy rather than autocast: autocast re-casts
        # every weight on every call outside one long-lived autocast region, which costs ~20 ms here.
        # Grad-CAM runs on the same copy: one pass gives the heatmap and exactly the probabilities
        # of a plain prediction, in half the time of a float32 Grad-CAM; its map agrees with the
        # float32 map (benchmarks/precision_agreement.py compares the maps on validation films).
        self.precision = resolve_precision(precision)
        self._fast = None
        # backend="onnx": plain predictions run on an onnxruntime session of the exported graph
        # (modeling.onnx_export; the same logits and head features); Grad-CAM keeps the torch model.
        self._onnx = onnx_session
        self.backend = "torch" if onnx_session is None else ("auto" if keep_torch_fast_path else "onnx")
        if self.precision == "bfloat16" and (onnx_session is None or keep_torch_fast_path):
            import copy

            self._fast = copy.deepcopy(self.model).to(torch.bfloat16).eval()
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        self.calibration = Calibration.from_config(model.config)
        labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
        if labels != LABELS:
            raise ValueError(f"model labels {labels} are not this project's {LABELS}")
        self._cam = None
        self._compiled = None  # compile(): an Inductor-compiled copy for single-film plain passes
        self._tap: dict[str, torch.Tensor] = {}
        self._compiled_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str, *, revision: str | None = None, precision: str = "float32",
                        backend: str = "torch", onnx_variant: str = "float32", **kwargs) -> "Predictor":
        """Load model + image processor from a Hub id or a ``save_pretrained`` directory. Weights
        stored in fp16/bf16 are upcast to float32; ``precision`` is the compute precision
        ("float32", "bfloat16" or "auto": bf16 where the CPU has it natively). ``backend="onnx"`` runs
        plain predictions with onnxruntime on ``onnx/<variant file>`` saved beside the weights
        (``cxr-export --onnx``; ``onnx_variant`` "float32", "int8" or "float16")."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # backend="auto": both fast paths are loaded; choose_backend() keeps the faster on this machine
        model = AutoModelForImageClassification.from_pretrained(
            model_id_or_dir, revision=revision, dtype=torch.float32, **kwargs)
        # backend="pil": the backend training used; with torchvision installed transformers would
        # otherwise pick its torchvision resize, which differs slightly (train/serve skew).
        processor = AutoImageProcessor.from_pretrained(model_id_or_dir, revision=revision, backend="pil")
        sess = None
        if backend in ("onnx", "auto"):
            from .gate import file_beside
            from .onnx_export import VARIANTS, session

            graph = file_beside(str(model_id_or_dir), f"onnx/{VARIANTS[onnx_variant]}", revision)
            if graph is None and backend == "onnx":
                raise FileNotFoundError(f"{model_id_or_dir} has no onnx/{VARIANTS[onnx_variant]}: export it with "
                                        f"cxr-export --model {model_id_or_dir} --onnx ...")
            sess = session(graph, torch.get_num_threads()) if graph is not None else None
        return cls(model, processor, model_id=str(model_id_or_dir),
                   revision=resolve_revision(str(model_id_or_dir), revision), precision=precision,
                   gate=load_gate(str(model_id_or_dir), revision), scope=load_scope(str(model_id_or_dir), revision),
                   onnx_session=sess, keep_torch_fast_path=backend == "auto" and sess is not None)

    def choose_backend(self, image: Image.Image, repeats: int = 5) -> dict[str, float]:
        """With ``backend="auto"``: time plain predictions of ``image`` with the torch fast path and
        the onnxruntime session, keep the faster (median ms), free the other; returns the timings.
        (Which is faster depends on the CPU: native bf16 favours torch, int8 VNNI onnxruntime.)"""
        import time

        if self.backend != "auto":
            return {}
        times = {}
        for name in ("torch", "onnx"):
            self.backend = name
            self.predict_one(image)
            ms = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.predict_one(image)
                ms.append((time.perf_counter() - t0) * 1000)
            times[name] = float(np.median(ms))
        self.backend = min(times, key=times.get)
        if self.backend == "torch":
            self._onnx = None
        else:
            self._fast = self._compiled = None
        return times

    def compile(self, example: Image.Image | None = None) -> dict[str, Any]:
        """Compile the plain-prediction network with TorchInductor, its weights frozen into the graph
        (``torch.compile(..., options={"freezing": True})``): on this project's CPU a bf16 pass of
        DINOv2-small takes about a tenth less time (``benchmarks/latency.py``). Used for single-film
        plain predictions (in the Space: batch rows and API calls without a heatmap); batches of several
        films and Grad-CAM keep the eager network, so no other input shape triggers a recompilation.

        Compiling takes tens of seconds (one call at start-up, as the Space's warm-up does) and needs
        a C++ compiler. Any failure, or answers further than 0.02 from the eager pass on ``example``,
        leaves the predictor as it was. Returns what happened: ``compiled``, ``seconds``,
        ``max_abs_prob_diff`` or ``reason``."""
        import copy
        import time

        if self._onnx is not None and self.backend == "onnx":
            return {"compiled": False, "reason": "the onnxruntime backend answers plain predictions"}
        img = example if example is not None else Image.fromarray(
            (np.indices((256, 256)).sum(0) % 256).astype(np.uint8), "L")
        eager_net = self._fast if self._fast is not None else self.model
        pv = pixel_values(self.processor, [_as_gray(img)]).to(self.device)  # where the network is (Predictor.to)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), _head_inputs(eager_net, True) as eager_feats:  # the reference: eager torch
                eager_logits = eager_net(pixel_values=pv.to(eager_net.dtype)).logits.float()
            net = copy.deepcopy(eager_net).eval()
            for m in net.modules():  # a deep copy takes the original's hooks along: the copy keeps only its tap
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
            # registered before compiling, so the graph keeps it: the head's input, for the gate and scope
            classifier_head(net).register_forward_pre_hook(lambda _m, args: self._tap.__setitem__("features", args[0]))
            compiled = torch.compile(net, options={"freezing": True})
            with torch.inference_mode():
                logits = compiled(pixel_values=pv.to(net.dtype)).logits.float()
        except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported op...: eager keeps serving
            return {"compiled": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
        feats = self._tap.pop("features", None)
        diff = float((torch.softmax(logits, -1) - torch.softmax(eager_logits, -1)).abs().max())
        if not diff <= 0.02:
            return {"compiled": False, "reason": f"answers differ from the eager pass by {diff:.4f}"}
        # the input gate and the scope check read these features: without them, or with others, they
        # would fall silent or decide otherwise, so such a compilation is not used
        ref = eager_feats[0].float()
        feat_err = (float("inf") if feats is None or feats.shape != ref.shape
                    else float((feats.float() - ref).norm() / ref.norm().clamp_min(1e-12)))
        if not feat_err <= 0.02:
            return {"compiled": False, "reason": f"the head features the checks read differ (relative {feat_err:.4f})"}
        self._compiled = compiled
        return {"compiled": True, "seconds": round(time.perf_counter() - t0, 1), "max_abs_prob_diff": diff,
                "features_relative_diff": feat_err}

    @property
    def threshold(self) -> float:
        return float(self.calibration.pneumonia_threshold)

    def class_index(self, target: int | str | None) -> int | None:
        if target is None or isinstance(target, int):
            return target
        if target not in LABELS:
            raise ValueError(f"unknown class {target!r}; choose one of {LABELS}")
        return LABELS.index(target)

    @property
    def device(self) -> torch.device:
        """Where the torch passes run (the CPU unless :meth:`to` moved them)."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Predictor":
        """Run the torch passes on ``device``: ``cxr-predict --output`` under ``accelerate launch`` puts
        each process's predictor on its GPU. Pixels go there and logits and head features come back to
        the host. The compiled copy is dropped (compile again after moving) and an onnxruntime session,
        a CPU one, is left as it is. Returns the predictor."""
        self.model.to(device)
        if self._fast is not None:
            self._fast.to(device)
        self._compiled = None
        self._cam = None
        return self

    @property
    def _cam_net(self):
        """The network Grad-CAM runs on: the compute-precision copy when there is one."""
        return self._fast if self._fast is not None else self.model

    def _gradcam(self):
        net = self._cam_net
        if self._cam is None or self._cam.model is not net:
            from .gradcam import GradCam  # imported lazily: only heatmap users pay for pytorch-grad-cam

            self._cam = GradCam(net)
        return self._cam

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Raw (calibrated) logits for already-loaded PIL images, no heatmap."""
        return self._forward(list(images))[0]

    @property
    def reads_features(self) -> bool:
        """True when a gate or a scope check reads the head's input features of each pass."""
        return self.gate is not None or self.scope is not None

    def _forward(self, images: list[Image.Image]) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits, and the head's input features when a gate or scope check reads them (same pass)."""
        return self._forward_pixels(pixel_values(self.processor, images))

    def _forward_pixels(self, pv: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        if self._onnx is not None and self.backend != "torch":
            logits, feats = self._onnx.run(["logits", "features"], {"pixel_values": pv.float().numpy()})
            return torch.from_numpy(logits), (feats if self.reads_features else None)
        if self._compiled is not None and pv.shape[0] == 1 and self.backend != "onnx":
            try:
                # one call at a time: the tap is this predictor's, and a compiled pass uses every thread anyway
                with self._compiled_lock, torch.inference_mode():
                    logits = self._compiled(pixel_values=pv.to(device=self.device, dtype=self._cam_net.dtype)
                                            ).logits.float().cpu()
                    feats = self._tap.pop("features", None)
                if feats is not None or not self.reads_features:
                    return logits, (feats.float().cpu().numpy() if self.reads_features else None)
                raise RuntimeError("the compiled pass gave no head features")
            except Exception:  # noqa: BLE001 - the eager network answers, and from now on
                logger.warning("compiled pass failed; the eager network answers from now on", exc_info=True)
                self._compiled = None
        net = self._fast if self._fast is not None else self.model
        weight = next(net.parameters())
        with torch.inference_mode(), _head_inputs(net, self.reads_features) as feats:
            logits = net(pixel_values=pv.to(device=weight.device, dtype=weight.dtype)).logits.float().cpu()
        return logits, (feats[0].float().cpu().numpy() if feats else None)

    def predict(
        self,
        images: Iterable[ImageInput],
        *,
        heatmap: bool = False,
        target_class: int | str | None = None,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Predict each image (path, bytes, file object or PIL image). A file that cannot be read
        raises :class:`modeling.image_io.ImageLoadError` before any model work."""
        grays = [_as_gray(im) for im in images]
        target = self.class_index(target_class)
        out: list[Prediction] = []
        for start in range(0, len(grays), batch_size):
            batch = grays[start:start + batch_size]
            maps = classes = feats = None
            if heatmap:
                from .gradcam import cam_to_image

                net = self._cam_net
                weight = next(net.parameters())
                pv = pixel_values(self.processor, batch).to(device=weight.device, dtype=weight.dtype)
                with _head_inputs(net, self.reads_features) as captured:
                    res = self._gradcam().explain(pv, None if target is None else [target] * len(batch))
                feats = captured[0].detach().float().cpu().numpy() if captured else None
                logits = res.logits.detach().float().cpu()
                maps = [cam_to_image(m, im.size, is_letterbox(self.processor), crop_fraction(self.processor))
                        for m, im in zip(res.maps, batch)]
                classes = res.target_classes
            else:
                logits, feats = self._forward(batch)
            out += self._predictions(logits, feats, [im.size for im in batch], maps, classes)
        return out

    def predict_pixel_values(self, pixel_values: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Prediction]:
        """Predictions for a batch already through the image processor (no heatmap): what
        :mod:`modeling.archive` calls with films decoded and processed in worker processes."""
        return self._predictions(*self._forward_pixels(pixel_values), image_sizes)

    def _predictions(self, logits: torch.Tensor, feats: np.ndarray | None, sizes: Sequence[tuple[int, int]],
                     maps: list | None = None, classes: list | None = None) -> list[Prediction]:
        verdicts = self.gate.verdicts(feats) if self.gate is not None and feats is not None else None
        scopes = self.scope.verdicts(feats) if self.scope is not None and feats is not None else None
        probs = torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float64)
        out = []
        for i, (p, size) in enumerate(zip(probs, sizes)):
            p_pneu = pneumonia_probability(p)
            answered = scopes is None or not scopes[i].out_of_scope
            out.append(Prediction(
                label=LABELS[int(p.argmax())] if answered else None,
                probabilities={name: float(v) for name, v in zip(LABELS, p)},
                pneumonia_probability=p_pneu,
                pneumonia=(p_pneu >= self.threshold) if answered else None,
                threshold=self.threshold,
                image_size=tuple(size),
                heatmap=None if maps is None else maps[i].astype(np.float32),
                heatmap_class=None if classes is None else LABELS[int(classes[i])],
                gate=None if verdicts is None else verdicts[i],
                scope=None if scopes is None else scopes[i],
            ))
        return out

    def predict_one(self, image: ImageInput, **kwargs) -> Prediction:
        return self.predict([image], **kwargs)[0]


class _head_inputs:
    """Collect the classification head's input during a forward pass (a pre-hook), when ``enabled``:
    the features the input gate reads, at no extra cost."""

    def __init__(self, model, enabled: bool) -> None:
        self.model, self.enabled, self.captured, self._hook = model, enabled, [], None

    def __enter__(self) -> list:
        if self.enabled:
            self._hook = classifier_head(self.model).register_forward_pre_hook(
                lambda _m, args: self.captured.append(args[0].detach()))
        return self.captured

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()

"""Knowledge distillation: a student learns the averaged probabilities of several teachers.

Why: an ensemble of two recipes is more robust than either, but costs one forward pass per member;
the Space, ``pipeline()`` and the latency target need one stock ``AutoModelForImageClassification``.
Distilling (Hinton et al. 2015, arXiv 1503.02531) keeps one network. The teachers score the *same*
augmented view the student sees ("consistent" teaching, Beyer et al. 2022, arXiv 2106.05237), so the
student learns the ensemble's function on the training distribution, not on fixed soft labels.

Teachers are our released (calibrated) models: their logits already carry the temperature, so the
averaged probabilities are the calibrated ensemble's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from .labels import LABELS
from .preprocessing import pixel_values


class TeacherError(ValueError):
    """A teacher that cannot teach this student: other labels or other pixels."""


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(teacher || student at temperature tau), averaged over the batch; the tau^2 keeps the
    gradient's scale comparable with the hard-label loss as tau changes (Hinton et al.)."""
    log_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    return F.kl_div(log_student, teacher_probs.float(), reduction="batchmean") * tau ** 2


@dataclass
class Teachers:
    """Frozen teacher models, scored together: :meth:`probs` is their mean probability at ``tau``."""

    models: list[PreTrainedModel]
    tau: float

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for the student's backward
    def probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(pixel_values=pixel_values).logits.float() / self.tau, dim=-1)
                            for m in self.models]).mean(0)

    def to(self, device) -> "Teachers":
        self.models = [m.to(device) for m in self.models]
        return self


def _probe_image() -> Image.Image:
    """A fixed, film-like grey image (a gradient with structure) to compare preprocessing on."""
    y, x = np.mgrid[0:300, 0:260]
    return Image.fromarray(((x * 0.6 + y * 0.3 + 40 * np.sin(x / 9.0)) % 256).astype(np.uint8), "L")


def load_teachers(paths: list[str], student_processor, tau: float) -> Teachers:
    """Load each teacher for inference and check it can teach: our three labels in our order, and the
    same pixel values as the student's processor for the same film (a teacher fed another input size
    or normalisation would teach on inputs it never saw)."""
    if tau <= 0:
        raise TeacherError(f"--distill-temperature must be > 0, got {tau}")
    probe = _probe_image()
    want = pixel_values(student_processor, [probe])
    models = []
    for path in paths:
        model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if names != list(LABELS):
            raise TeacherError(f"teacher {path}: labels {names}, the student's are {list(LABELS)}")
        # backend="pil", as training and the Predictor load processors (torchvision resizes differently)
        got = pixel_values(AutoImageProcessor.from_pretrained(path, backend="pil"), [probe])
        if got.shape != want.shape or float((got - want).abs().max()) > 1e-4:
            raise TeacherError(f"teacher {path} sees other pixels than the student (its processor: input "
                               f"{tuple(got.shape[-2:])}, the student's {tuple(want.shape[-2:])}, or another "
                               "normalisation or crop)")
        model.requires_grad_(False)
        models.append(model)
    return Teachers(models=models, tau=tau)

"""Does this look like a frontal chest X-ray? A deliberately simple, documented gate.

The classifier answers one of three classes for *any* picture, a cat included, so the Space refuses
what is clearly not a radiograph before the model sees it, and the contributor validator warns about
it. The checks are cheap rules on what the loader saw, not a learned detector, so they catch the
obvious (colour photos, screenshots, non-chest DICOM, tiny or blank images) and miss the subtle (a
knee radiograph, a lateral chest film without DICOM tags). That limit is stated where the result is
shown.

Rules (each returns a readable reason):

* colour: radiographs are gray. The colourfulness of Hasler & Suesstrunk (2003) on a small copy of
  the *original* pixels; scanned films and screenshots of gray viewers stay below ~5, photos are
  typically > 20. Threshold :data:`MAX_COLOURFULNESS`.
* DICOM tags, when present: Modality must be a projection radiograph (CR, DX, or DR/RG/OT-free
  legacy values listed in :data:`RADIOGRAPH_MODALITIES`), BodyPartExamined chest-like, ViewPosition
  not lateral.
* geometry: shorter side >= :data:`MIN_SIDE` px, aspect ratio within :data:`ASPECT_RANGE`
  (chest films are between 1:1.6 and 1.6:1; 2:1 leaves room for cropped exports).
* content: not nearly uniform (pixel standard deviation >= :data:`MIN_STD`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .image_io import ImageInfo

MAX_COLOURFULNESS = 15.0
MIN_SIDE = 64
ASPECT_RANGE = (0.5, 2.0)
MIN_STD = 8.0
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "PORT CHEST", "TORSO"}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "RLD", "LLD"}

COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "P", "PA", "YCbCr", "LAB", "HSV", "LA"}


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk's colourfulness of an (H, W, 3) array (0 for gray)."""
    rgb = rgb.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def original_colourfulness(data: bytes) -> float | None:
    """Colourfulness of a raster file's own pixels (None when Pillow cannot open it, e.g. DICOM).
    Decodes a reduced copy (``draft``/``thumbnail``): cheap even for a large photo."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in COLOUR_MODES:
                return 0.0
            im.draft("RGB", (256, 256))
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            return colourfulness(np.asarray(im))
    except Exception:  # noqa: BLE001 - the loader already accepted the file; this is advisory only
        return None


def xray_problems(gray: Image.Image, info: ImageInfo, data: bytes | None = None) -> list[str]:
    """Reasons why ``gray`` (the loader's output, with its ``info``) is not a plausible frontal chest
    X-ray; empty when none is found. ``data`` (the file's bytes) enables the colour rule."""
    problems: list[str] = []
    if info.is_dicom:
        modality = (info.modality or "").upper()
        if modality and modality not in RADIOGRAPH_MODALITIES:
            problems.append(f"DICOM modality {modality} is not a projection radiograph (CR/DX)")
        part = (info.body_part or "").upper()
        if part and part not in CHEST_BODY_PARTS:
            problems.append(f"DICOM body part {part} is not the chest")
        view = (info.view_position or "").upper()
        if view in LATERAL_VIEWS:
            problems.append(f"DICOM view {view} is lateral; the model reads frontal (PA/AP) films")
    elif data is not None and info.mode.split()[0] in COLOUR_MODES:
        c = original_colourfulness(data)
        if c is not None and c > MAX_COLOURFULNESS:
            problems.append(f"a colour image (colourfulness {c:.0f} > {MAX_COLOURFULNESS:.0f}); X-rays are gray")
    w, h = gray.size
    if min(w, h) < MIN_SIDE:
        problems.append(f"too small ({w}x{h} px; at least {MIN_SIDE} px on the shorter side)")
    ratio = w / h if h else float("inf")
    if not ASPECT_RANGE[0] <= ratio <= ASPECT_RANGE[1]:
        problems.append(f"aspect ratio {ratio:.2f} is far from a chest film's")
    small = gray.copy()
    small.thumbnail((256, 256))
    if float(np.asarray(small, dtype=np.float32).std()) < MIN_STD:
        problems.append("the image is nearly uniform (no anatomy visible)")
    return problems


# A soft rule beside xray_problems (warned about, never refused on its own): left-right
# symmetry at 64x64, measured on the 624 official Kermany test images (224x224) and 20
# full-resolution Kermany films: correlation with the mirror image, 1st percentile 0.32, 5th 0.55,
# median 0.80; random textures score about 0. The 0.30 cut warns for about 1 in 100 real films.
MIN_SYMMETRY = 0.30


def symmetry_problems(gray: Image.Image) -> list[str]:
    """A frontal chest is roughly left-right symmetric (spine in the middle, a lung each side); a
    lateral film without DICOM tags, a hand or a screenshot mostly is not. Limits: a symmetric
    non-chest image (skull, pelvis, frontal abdomen) passes; about 1% of real frontal films (rotated
    patients, large one-sided consolidations) are flagged. The contributor validator warns with it,
    the Space adds it as a note."""
    small = np.asarray(gray.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float64)
    if small.std() <= 1.0:  # a flat image is reported as such by xray_problems
        return []
    sym = float(np.corrcoef(small.ravel(), small[:, ::-1].ravel())[0, 1])
    if sym >= MIN_SYMMETRY:
        return []
    return [f"not left-right symmetric (correlation with its mirror image {sym:.2f} < {MIN_SYMMETRY}): "
            "a lateral view, a heavily rotated film, or not a chest film?"]

"""What the image loaders share: the error type with its reason codes, the description of what was
loaded, the pixel limits checked on headers, and the linear rescaling of deep data to 8 bits.

Kept apart so that :mod:`modeling.image_io` (files, rasters) and :mod:`modeling.dicom` (DICOM) use one
definition without importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

#: Largest accepted image, in pixels (width * height).  The largest real chest X-ray detectors are
#: about 4300 x 4300 = 18 MP; 50 MP leaves headroom while keeping a decoded image (and its float
#: working copy) to a few hundred MB.  Checked from the header, before any pixel is decoded.
MAX_PIXELS: int = 50_000_000

#: Every value :attr:`ImageLoadError.reason` can take.
REASONS: tuple[str, ...] = (
    "empty",  # zero bytes
    "too_large",  # too many pixels, or too many bytes
    "not_an_image",  # not an image at all (text, PDF, zip, random bytes)
    "unsupported",  # an image, but a format / transfer syntax / layout we cannot decode
    "truncated",  # recognised format whose data is truncated or corrupt
    "no_pixel_data",  # a DICOM object without an image (report, DICOMDIR, ...)
    "not_dicom",  # read_dicom_metadata() given something that is not DICOM
)

#: Keys returned by :func:`read_dicom_metadata` (and ``ImageInfo.dicom_tags``): technical tags only.
#: Deliberately no patient, study, institution, date/time or instance identifiers.
DICOM_METADATA_KEYS: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SOPClassUID",
    "SOPClassName",
    "TransferSyntaxUID",
)

class ImageLoadError(ValueError):
    """The input is not an image this project can use.

    ``reason`` is one of :data:`REASONS` (stable, for counting in reports); ``detail`` is the human
    explanation; ``name`` is the file name when known.  ``str(err)`` is ``"<name>: <detail>"``.
    """

    def __init__(self, reason: str, detail: str, name: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ImageLoadError reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = detail
        self.name = name
        super().__init__(f"{name}: {detail}" if name else detail)

    def __reduce__(self):  # keep it picklable (datasets.map(num_proc>1) ships exceptions around)
        return (type(self), (self.reason, self.detail, self.name))


@dataclass(frozen=True)
class ImageInfo:
    """What the loader found and what it did, for reports and for the validator.

    ``width``/``height`` are those of the returned image (they differ from the stored size only
    when an EXIF orientation rotated it by 90 degrees).  ``mode`` describes the *original* pixels:
    a Pillow mode ("L", "RGB", "RGBA", "P", "CMYK", "I;16", ...) or, for DICOM, photometric
    interpretation plus stored bits ("MONOCHROME1 10-bit").  ``converted`` is True when pixel values
    or geometry were changed on the way to 8-bit grayscale; ``notes`` says what was done.
    The DICOM fields hold technical tags only; patient tags are never read into this object.
    """

    format: str
    mode: str
    bits: int | None
    width: int
    height: int
    converted: bool
    notes: tuple[str, ...] = ()
    is_dicom: bool = False
    n_frames: int = 1
    file_bytes: int = 0
    name: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    photometric: str | None = None
    dicom_tags: Mapping[str, Any] = field(default_factory=dict)


class _Log:
    """Collects notes; ``changed`` becomes True as soon as a pixel-altering step is recorded."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.changed = False

    def add(self, note: str, *, changed: bool = True) -> None:
        self.notes.append(note)
        self.changed = self.changed or changed



def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _pixel_limit(max_pixels: int) -> int:
    # Also honour Pillow's own bomb threshold (we never change Image.MAX_IMAGE_PIXELS), so that
    # anything Pillow would warn about is refused here as well.  (Image.open itself still emits its
    # DecompressionBombWarning for such files; we leave the process-wide, thread-unsafe warning
    # filters alone.  Above twice that threshold Image.open raises, see _bomb_error.)
    if Image.MAX_IMAGE_PIXELS:
        return min(max_pixels, Image.MAX_IMAGE_PIXELS)
    return max_pixels


def _bomb_error(exc: Exception, max_pixels: int, name: str | None) -> ImageLoadError:
    """Pillow's DecompressionBombError (raised by Image.open itself) as our too_large error."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(match.group(1)) / 1e6:.1f} MP" if match else "the image"
    limit = _pixel_limit(max_pixels)
    return ImageLoadError(
        "too_large", f"image too large: {size} exceeds the {limit / 1e6:g} MP limit", name
    )


def _check_pixels(width: int, height: int, max_pixels: int, name: str | None) -> None:
    """Refuse images whose header announces more than ``max_pixels`` pixels (or none at all)."""
    if width <= 0 or height <= 0:
        raise ImageLoadError("truncated", f"corrupt header: image size {width}x{height}", name)
    limit = _pixel_limit(max_pixels)
    n = width * height
    if n > limit:
        raise ImageLoadError(
            "too_large",
            f"image too large: {width}x{height} = {n / 1e6:.1f} MP exceeds the "
            f"{limit / 1e6:g} MP limit",
            name,
        )


def _scale_minmax(
    arr: np.ndarray,
    log: _Log,
    kind: str,
    lo: float | None = None,
    hi: float | None = None,
) -> np.ndarray:
    """Linearly map ``lo..hi`` (default: the data's finite min..max) to 0..255, rounding to nearest.

    float32 working copy: exact for 16-bit data, 24-bit precise otherwise, which is far below one
    output level.  Non-finite values (float images) become 0.
    """
    a = np.array(arr, dtype=np.float32, copy=True)
    finite = np.isfinite(a)
    if not finite.all():
        a[~finite] = np.nan
        log.add("non-finite values set to black")
    if lo is None or hi is None:
        if not finite.any():
            log.add(f"{kind} image has no finite values; returned black")
            return np.zeros(a.shape, dtype=np.uint8)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        what = f"{kind} rescaled to 8-bit (min..max {lo:g}..{hi:g})"
    else:
        what = f"{kind} rescaled to 8-bit (range {lo:g}..{hi:g})"
    if hi <= lo:
        log.add(f"{kind} image is constant ({lo:g}); returned black")
        return np.zeros(a.shape, dtype=np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    a[np.isnan(a)] = 0
    log.add(what)
    return a.astype(np.uint8)

"""The one image loader of the project.

Every entry point (dataset build, training, the Gradio Space, the contributor validator) loads
images through :func:`load_image` so that they all see exactly the same pixels for the same file.
Differences here would show up as train/serve skew, as near-duplicates that hash differently, or as
a file that the validator accepts but the Space rejects.

Contract
--------
* Input: a path (``str`` or ``os.PathLike``), raw ``bytes``/``bytearray``/``memoryview``, or a
  binary file object (read from its current position).  A ``str`` is always a path, never content.
* Output: an 8-bit grayscale (mode ``"L"``) :class:`PIL.Image.Image`.  Chest X-rays are
  single-channel; one well-defined representation keeps hashing and preprocessing simple.
* The returned image is built from pixels only: it carries no metadata at all (no EXIF, ICC
  profile, PNG text chunks, or DICOM tags).  That is the project's PHI guarantee for pixels that
  leave this module.
* Bad *content* raises :class:`ImageLoadError` (a ``ValueError``) with a stable ``reason`` code so a
  build report can count failures by cause.  I/O problems (missing file, permission denied) are not
  properties of the image and propagate as the usual ``OSError``.

Accepted formats: JPEG (incl. MPO), PNG, TIFF, BMP, WebP through Pillow, and DICOM through pydicom
(compressed transfer syntaxes through pydicom's decoders, i.e. pylibjpeg or Pillow).  The content
decides, never the file extension: DICOM is recognised by its "DICM" magic at offset 128, or, for
files written without preamble/file meta header, by a forced pydicom parse that must find Pixel
Data.  Pillow is restricted to the allow-list above, which also keeps risky decoders (EPS via
Ghostscript, etc.) out of reach of uploaded files.  Size guards run on the header, before any pixel
is decoded (MAX_PIXELS, MAX_FILE_BYTES); decoding is forced inside the loader so truncated files
fail here, and Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (a RuntimeError
says so if some other code flipped it).

Pixel-value decisions (the ones that matter for reproducibility)
----------------------------------------------------------------
* 8-bit data is never rescaled: an 8-bit grayscale image passes through unchanged, RGB and CMYK go
  to luminance with Pillow's ITU-R 601-2 transform (a gray image stored as RGB comes back
  bit-identical), alpha is composited onto black (what transparent means on a radiograph viewer),
  palettes are expanded.
* Data deeper than 8 bits (16-bit PNG/TIFF, 32-bit integer, float, DICOM without a window) is
  scaled linearly from its *actual* min..max to 0..255, rounding to nearest.  We use the exact
  extremes rather than robust percentiles because that is deterministic, strictly order-preserving
  and throws no data away; contrast normalisation belongs to the preprocessing step, not to I/O.
  A naive ``convert("L")`` would clip 16-bit data, which is why it is not used.
* DICOM: Modality LUT (rescale slope/intercept) first, then the VOI LUT (VOI LUT Sequence, else
  Window Center/Width, first view when several are given).  A window is honoured as the
  acquisition intended: its full output range maps to 0..255 (no re-stretching to the data).
  Without a VOI transform, 8-bit unsigned data passes through unchanged (so a DICOM and the same
  image exported as PNG give the same pixels) and anything else is min..max scaled.  MONOCHROME1
  is inverted last (``255 - x``).  Multi-frame: the first frame.  Colour: luminance.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

# Register exactly the Pillow plugins we accept (Image.open(formats=...) does not load plugins
# lazily for names it has not seen yet).
from PIL import (  # noqa: F401  (imported for their registration side effect)
    BmpImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

__all__ = [
    "DICOM_METADATA_KEYS",
    "IMAGE_EXTENSIONS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "REASONS",
    "ImageInfo",
    "ImageLoadError",
    "load_image",
    "load_image_with_info",
    "pixel_sha256",
    "read_dicom_metadata",
]

#: Largest accepted image, in pixels (width * height).  The largest real chest X-ray detectors are
#: about 4300 x 4300 = 18 MP; 50 MP leaves headroom while keeping a decoded image (and its float
#: working copy) to a few hundred MB.  Checked from the header, before any pixel is decoded.
MAX_PIXELS: int = 50_000_000

#: Largest accepted file, in bytes, checked before reading (from ``stat`` for paths).  Looked up at
#: call time, so tests can monkeypatch it.
MAX_FILE_BYTES: int = 512 * 1024 * 1024

#: Lower-case suffixes that directory readers should pick up.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom"}
)

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

# Pillow format names we accept (``Image.open(formats=...)``).  The JPEG opener also returns "MPO"
# images (JPEGs from cameras/phones that embed a second picture); those are reported as "JPEG".
_RASTER_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
_ACCEPTED_TEXT = "JPEG, PNG, TIFF, BMP, WebP or DICOM"

_MODES_8BIT_COLOUR = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_MODES_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;32", "I;32B", "I", "F")

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]


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


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_image(
    source: Source, *, max_pixels: int = MAX_PIXELS, name: str | None = None, max_side: int | None = None
) -> Image.Image:
    """Load ``source`` as an 8-bit grayscale ("L") PIL image without any metadata.

    See the module docstring for accepted inputs and the pixel-value rules.  ``name`` labels error
    messages when ``source`` is bytes or an anonymous stream.  ``max_side`` (for services that must
    bound memory and time per request): images whose long side is larger are reduced to it, JPEGs
    while decoding (libjpeg's DCT scaling, 1/2 to 1/8, then a resize), other formats right after
    decoding; the reduction is listed in the notes.  Raises :class:`ImageLoadError`.
    """
    image, _ = load_image_with_info(source, max_pixels=max_pixels, name=name, max_side=max_side)
    return image


def load_image_with_info(
    source: Source, *, max_pixels: int = MAX_PIXELS, name: str | None = None, max_side: int | None = None
) -> tuple[Image.Image, ImageInfo]:
    """Like :func:`load_image`, also returning an :class:`ImageInfo` describing the input (its
    ``width``/``height`` are those of the returned image)."""
    if max_side is not None and max_side < 16:
        raise ValueError(f"max_side must be at least 16 pixels, got {max_side}")
    data, name = _read_source(source, name)
    if not data:
        raise ImageLoadError("empty", "empty file (0 bytes)", name)

    if _has_dicom_magic(data):
        ds = _parse_dicom(data, name, headerless=False)
        return _fit_side(*_load_dicom(ds, data, name, max_pixels), max_side)

    result = _try_load_raster(data, name, max_pixels, max_side)
    if result is not None:
        return _fit_side(*result, max_side)

    # Neither "DICM" magic nor a Pillow format: maybe DICOM written without preamble/file meta.
    ds = _parse_dicom(data, name, headerless=True, require=("PixelData",))
    if ds is not None:
        return _fit_side(*_load_dicom(ds, data, name, max_pixels), max_side)

    raise _unrecognised(data, name)


def _fit_side(img: Image.Image, info: ImageInfo, max_side: int | None) -> tuple[Image.Image, ImageInfo]:
    """Reduce ``img`` so that its long side is at most ``max_side`` (area-averaging: no aliasing)."""
    if max_side is None or max(img.size) <= max_side:
        return img, info
    w, h = img.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = img.resize(size, Image.Resampling.BOX if max(w, h) > 2 * max_side else Image.Resampling.LANCZOS)
    note = f"reduced from {w}x{h} to {size[0]}x{size[1]} (working size: long side {max_side} px)"
    return small, replace(info, width=size[0], height=size[1], converted=True, notes=(*info.notes, note))


def to_grayscale(image: Image.Image, *, name: str | None = None) -> Image.Image:
    """Reduce an already-decoded PIL image (any mode) to 8-bit "L" with the same rules as
    :func:`load_image`, without metadata.

    For callers that receive decoded images (a ``datasets`` Image column, a PIL image handed to the
    predictor): they must see the same pixels a file load would give."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    gray = _pil_to_gray(image, _Log(), name)
    return Image.frombytes("L", gray.size, gray.tobytes())  # fresh image: no EXIF/ICC/text chunks


def pixel_sha256(image: Image.Image) -> str:
    """SHA-256 of a loaded image's 8-bit pixels and shape: the project's image identity.

    The dataset's ``image_sha256`` column, the Space's prediction records and the contributor
    validator all use it, so the same picture has the same hash whatever file format carried it
    (a DICOM and its PNG export, a re-saved JPEG of identical pixels)."""
    import hashlib

    arr = np.asarray(image, dtype=np.uint8)
    return hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()


def read_dicom_metadata(source: Source, *, name: str | None = None) -> dict[str, Any]:
    """Return a few non-identifying technical tags of a DICOM file (keys: DICOM_METADATA_KEYS).

    For callers that must tell a chest radiograph (Modality CR/DX, BodyPartExamined CHEST) from,
    say, a secondary capture.  Absent tags map to None.  Pixel data is not decoded.  Patient,
    study, date and instance identifiers are never returned.  Raises ImageLoadError("not_dicom")
    for anything that is not DICOM.
    """
    data, name = _read_source(source, name)
    if not data:
        raise ImageLoadError("empty", "empty file (0 bytes)", name)
    if _has_dicom_magic(data):
        ds = _parse_dicom(data, name, headerless=False)
    else:
        ds = _parse_dicom(
            data, name, headerless=True, require=("PixelData", "SOPClassUID", "Modality")
        )
        if ds is None:
            raise ImageLoadError("not_dicom", "not a DICOM file", name)
    return _dicom_tags(ds)


# --------------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _read_source(source: Source, name: str | None) -> tuple[bytes, str | None]:
    """Return all bytes of ``source`` (refusing more than MAX_FILE_BYTES before reading them)."""
    limit = MAX_FILE_BYTES
    too_big = "file too large: {} exceeds the {} limit"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        size = path.stat().st_size  # FileNotFoundError etc. propagate: an I/O problem, not content
        if size > limit:
            raise ImageLoadError("too_large", too_big.format(_mb(size), _mb(limit)), name)
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    elif hasattr(source, "read"):
        if name is None:
            fname = getattr(source, "name", None)
            name = fname if isinstance(fname, str) else None
        data = source.read(limit + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("load_image needs a binary file object (open the file with 'rb')")
        data = bytes(data)
    else:
        raise TypeError(
            f"unsupported source type {type(source).__name__}: pass a path, bytes or a binary "
            "file object"
        )
    if len(data) > limit:
        raise ImageLoadError(
            "too_large", too_big.format(f"more than {_mb(limit)}", _mb(limit)), name
        )
    return data, name


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


# --------------------------------------------------------------------------------------------------
# Raster formats (Pillow)
# --------------------------------------------------------------------------------------------------

# What Pillow's plugins raise on malformed headers/data (decoders use OSError; parsers the rest).
_PIL_PARSE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError
)

_RASTER_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "TIFF"),  # BigTIFF
    (b"MM\x00+", 0, "TIFF"),
    (b"BM", 0, "BMP"),  # see _raster_magic: reserved bytes must be zero too
)


def _raster_magic(data: bytes) -> str | None:
    for magic, offset, fmt in _RASTER_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if fmt == "BMP" and data[6:10] != b"\0\0\0\0":
                continue  # "BM" alone is too weak (a text file may start with it)
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _try_load_raster(
    data: bytes, name: str | None, max_pixels: int, max_side: int | None = None
) -> tuple[Image.Image, ImageInfo] | None:
    """Decode with Pillow; None when Pillow does not recognise the data as an accepted format."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Somebody flipped Pillow's global switch; truncated files would then decode as silently
        # gray-padded images and poison the dataset.  Fail loudly rather than flip it back.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; modeling.image_io requires it to be "
            "False so that truncated images are rejected"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=_RASTER_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels, name) from exc
    except UnidentifiedImageError:
        fmt = _raster_magic(data)
        if fmt is None:
            return None
        raise ImageLoadError("truncated", f"truncated or corrupt {fmt} (header unreadable)", name)
    except _PIL_PARSE_ERRORS as exc:  # plugin-specific header parse errors
        fmt = _raster_magic(data)
        if fmt is None:  # a plugin with a weak signature (BMP's "BM") choked on non-image data
            return None
        raise ImageLoadError("truncated", f"truncated or corrupt {fmt}: {exc}", name) from exc

    with img:
        fmt = "JPEG" if img.format == "MPO" else (img.format or "unknown")
        width, height = img.size
        _check_pixels(width, height, max_pixels, name)  # header only; nothing decoded yet
        orig_mode = img.mode
        log = _Log()
        if max_side is not None and fmt == "JPEG" and max(width, height) > 2 * max_side:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale for a fraction of the time and memory; draft
            # picks the smallest scale that still gives at least the requested size.
            scale = max_side / max(width, height)
            img.draft(img.mode, (max(1, int(width * scale)), max(1, int(height * scale))))
            if img.size != (width, height):
                log.add(f"decoded at {img.size[0]}x{img.size[1]} instead of {width}x{height} (JPEG DCT scaling)")
        try:
            n_frames = int(getattr(img, "n_frames", 1) or 1)  # TIFF walks its IFDs here
            if n_frames > 1:
                log.add(f"first of {n_frames} frames used", changed=False)
            img.load()  # force full decoding here, so truncation is reported now, not later
        except Image.DecompressionBombError as exc:
            raise _bomb_error(exc, max_pixels, name) from exc
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise ImageLoadError("truncated", f"truncated or corrupt {fmt}: {exc}", name) from exc
        img = _apply_exif_orientation(img, log)
        try:
            gray = _pil_to_gray(img, log, name)
        except (ImageLoadError, MemoryError):
            raise
        except Exception as exc:  # a mode Pillow cannot convert (e.g. LAB, HSV oddities)
            raise ImageLoadError(
                "unsupported", f"cannot convert {orig_mode} {fmt} to grayscale: {exc}", name
            ) from exc

    out = Image.frombytes("L", gray.size, gray.tobytes())  # fresh image: no EXIF/ICC/text chunks
    info = ImageInfo(
        format=fmt,
        mode=orig_mode,
        bits=_mode_bits(orig_mode),
        width=out.width,
        height=out.height,
        converted=log.changed,
        notes=tuple(log.notes),
        is_dicom=False,
        n_frames=n_frames,
        file_bytes=len(data),
        name=name,
    )
    return out, info


def _apply_exif_orientation(img: Image.Image, log: _Log) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (phones photographing films set it).

    A damaged EXIF block does not make the pixels unusable: it is ignored, with a note.
    """
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception as exc:
        log.add(f"unreadable EXIF ignored ({type(exc).__name__})", changed=False)
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    log.add(f"EXIF orientation {orientation} applied")
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # it also rewrites the EXIF block, which we discard anyway
        return img.transpose(_EXIF_TRANSPOSE[orientation])


_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _mode_bits(mode: str) -> int | None:
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F", "I;32", "I;32B"):
        return 32
    return 8


def _pil_to_gray(img: Image.Image, log: _Log, name: str | None) -> Image.Image:
    """Reduce any Pillow mode to 8-bit "L" (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "L":
        return img
    if mode == "1":
        log.add("bilevel expanded to 0/255")
        return img.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        log.add("palette expanded")
        return _pil_to_gray(img.convert("RGBA" if has_alpha else "RGB"), log, name)
    if mode in ("LA", "La", "RGBA", "RGBa"):
        if mode in ("La", "RGBa"):  # premultiplied: un-premultiply so the composite below is right
            img = img.convert(mode.upper())
        alpha = img.getchannel("A")
        colour = img.convert("RGB") if mode.startswith("RGB") else img.getchannel("L")
        if alpha.getextrema()[0] == 255:
            log.add(f"{mode} alpha channel (fully opaque) dropped")
            flat = colour
        else:
            log.add(f"{mode} flattened onto black")
            flat = Image.new(colour.mode, colour.size, 0)
            flat.paste(colour, mask=alpha)
        return _pil_to_gray(flat, log, name)
    if mode in _MODES_8BIT_COLOUR:
        log.add(f"{mode} converted to luminance (ITU-R 601-2)")
        rgb = img if mode == "RGB" else img.convert("RGB")
        return rgb.convert("L")
    if mode in _MODES_HIGH_DEPTH:
        arr = np.asarray(img)
        bits = _mode_bits(mode)
        kind = "float" if mode == "F" else f"{bits}-bit"
        return Image.fromarray(_scale_minmax(arr, log, kind), mode="L")
    raise ImageLoadError("unsupported", f"unsupported image mode {mode!r}", name)


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


# --------------------------------------------------------------------------------------------------
# DICOM (pydicom)
# --------------------------------------------------------------------------------------------------


def _has_dicom_magic(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _plausible_headerless_dicom(data: bytes) -> bool:
    """Cheap gate before pydicom's force=True parser: the first tag must be a low, even group.

    A dataset without preamble starts with (0002,xxxx) or (0008,xxxx) in practice; allowing the
    even groups up to 0x0028 in either byte order costs nothing and keeps text/zip/random bytes
    away from a parser that would happily invent elements out of them.
    """
    if len(data) < 8:
        return False
    for order in ("<", ">"):
        (group,) = struct.unpack(order + "H", data[:2])
        if 0x0002 <= group <= 0x0028 and group % 2 == 0:
            return True
    return False


def _parse_dicom(
    data: bytes,
    name: str | None,
    *,
    headerless: bool,
    require: tuple[str, ...] = (),
):
    """Parse a DICOM dataset (pixels not decoded).

    With ``headerless=True`` failures return None (the caller then reports "not an image") and the
    dataset is accepted only if it contains one of ``require``.  The transfer syntax is filled in
    when the file has no file meta header, from the encoding pydicom detected while parsing
    (Implicit VR Little Endian for the usual header-less files), so pixel decoding works.
    """
    if headerless and not _plausible_headerless_dicom(data):
        return None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        if headerless:
            return None
        raise ImageLoadError("truncated", f"truncated or corrupt DICOM: {exc}", name) from exc
    if not headerless and len(ds) == 0:
        # pydicom (force=True) hands back an empty dataset when the file ends inside an
        # undefined-length element, typically encapsulated (compressed) Pixel Data
        raise ImageLoadError(
            "truncated", "truncated or corrupt DICOM: no data elements could be read", name
        )
    if headerless:
        try:
            if not any(tag in ds for tag in require):
                return None
        except Exception:
            return None
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds) -> None:
    """Fill in a missing transfer syntax; records it in ``ds.image_io_assumed_ts`` for the notes."""
    ds.image_io_assumed_ts = None  # plain attribute, not a DICOM element (never written anywhere)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit or implicit is None:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.image_io_assumed_ts = meta.TransferSyntaxUID


def _plain(value: Any) -> Any:
    """pydicom element value -> plain Python (str/int/float/list/None)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):  # includes pydicom IS
        return int(value)
    if isinstance(value, (float, Decimal)):  # includes pydicom DSfloat/DSdecimal
        return float(value)
    if isinstance(value, (list, tuple, MultiValue)):
        return [_plain(v) for v in value]
    text = str(value).strip()
    return text or None


def _dicom_tags(ds) -> dict[str, Any]:
    """Whitelisted technical tags only (DICOM_METADATA_KEYS)."""
    tags: dict[str, Any] = {}
    for key in DICOM_METADATA_KEYS:
        value: Any = None
        try:
            if key == "SOPClassName":
                uid = ds.get("SOPClassUID")
                value = uid.name if uid is not None and hasattr(uid, "name") else None
                if value == str(uid):  # unknown UID: pydicom echoes it back
                    value = None
            elif key == "TransferSyntaxUID":
                value = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            else:
                value = ds.get(key)
        except Exception:
            value = None
        tags[key] = _plain(value)
    return tags


def _decoder_hint(ts) -> str:
    """What would make pydicom decode ``ts``, in pydicom's own words (e.g. 'install pylibjpeg>=2.0
    and pylibjpeg-openjpeg>=2.0')."""
    try:
        missing = get_decoder(ts).missing_dependencies
    except Exception:  # NotImplementedError: pydicom has no decoder for this transfer syntax
        return "pydicom has no decoder for this transfer syntax"
    if not missing:
        return "decoder unavailable"
    options = [m.split(" - requires ", 1)[-1] for m in missing]
    return "install " + " or ".join(options)


def _load_dicom(
    ds, data: bytes, name: str | None, max_pixels: int
) -> tuple[Image.Image, ImageInfo]:
    tags = _dicom_tags(ds)
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if tags.get("Rows") and tags.get("Columns"):
            # image attributes without the image: the file was cut before its Pixel Data element
            raise ImageLoadError(
                "truncated",
                "truncated DICOM: image attributes (Rows/Columns) present but no Pixel Data",
                name,
            )
        sop = tags.get("SOPClassName") or tags.get("SOPClassUID") or "unknown"
        raise ImageLoadError("no_pixel_data", f"DICOM has no pixel data (SOP class: {sop})", name)
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        bits_stored = ds.get("BitsStored") or ds.get("BitsAllocated")
        bits_stored = int(bits_stored) if bits_stored else None
        n_frames = int(ds.get("NumberOfFrames") or 1)
        ts = ds.file_meta.TransferSyntaxUID
    except Exception as exc:  # garbage in the image pixel module
        raise ImageLoadError("truncated", f"corrupt DICOM header: {exc}", name) from exc
    if not rows or not cols:
        raise ImageLoadError("truncated", "corrupt DICOM: Rows/Columns missing", name)
    _check_pixels(cols, rows, max_pixels, name)  # header only; nothing decoded yet
    log = _Log()
    assumed = getattr(ds, "image_io_assumed_ts", None)
    if assumed is not None:
        log.add(f"no transfer syntax in file; {assumed.name} assumed", changed=False)
    if n_frames > 1:
        log.add(f"first of {n_frames} frames used", changed=False)

    try:
        arr = pixel_array(ds, index=0)  # first frame only; YBR is converted to RGB by pydicom
    except MemoryError:
        raise
    except Exception as exc:
        # pydicom: NotImplementedError when no decoder exists for the transfer syntax,
        # RuntimeError "... missing dependencies" when the decoder packages are not installed,
        # RuntimeError "... exceptions were raised by all available plugins" for corrupt data.
        if isinstance(exc, NotImplementedError) or (
            isinstance(exc, RuntimeError) and "missing dependencies" in str(exc)
        ):
            raise ImageLoadError(
                "unsupported",
                f"unsupported DICOM transfer syntax {getattr(ts, 'name', ts)} ({ts}): cannot "
                f"decode its pixel data here ({_decoder_hint(ts)})",
                name,
            ) from exc
        detail = " ".join(str(exc).split())
        raise ImageLoadError(
            "truncated", f"truncated or corrupt DICOM pixel data: {detail}", name
        ) from exc

    try:
        if arr.ndim == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
                log.add("palette expanded")
            elif photometric not in ("RGB",) and not photometric.startswith("YBR"):
                raise ImageLoadError(
                    "unsupported",
                    f"unsupported DICOM photometric interpretation {photometric}",
                    name,
                )
            gray8 = _dicom_colour_to_gray(arr, log)
        elif arr.ndim == 2 and photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            log.add("palette expanded")
            gray8 = _dicom_colour_to_gray(rgb, log)
        elif arr.ndim == 2:
            gray8 = _dicom_gray_to_8bit(arr, ds, photometric, bits_stored, log)
        else:
            raise ImageLoadError(
                "unsupported", f"unsupported DICOM pixel layout {arr.shape} ({photometric})", name
            )
    except (ImageLoadError, MemoryError):
        raise
    except Exception as exc:  # malformed LUTs and the like
        raise ImageLoadError("truncated", f"corrupt DICOM pixel module: {exc}", name) from exc

    out = Image.fromarray(np.ascontiguousarray(gray8), mode="L")  # pixels only: no DICOM metadata
    info = ImageInfo(
        format="DICOM",
        mode=f"{photometric or 'UNKNOWN'} {bits_stored}-bit" if bits_stored else photometric,
        bits=bits_stored,
        width=out.width,
        height=out.height,
        converted=log.changed,
        notes=tuple(log.notes),
        is_dicom=True,
        n_frames=n_frames,
        file_bytes=len(data),
        name=name,
        modality=tags.get("Modality"),
        body_part=tags.get("BodyPartExamined"),
        view_position=tags.get("ViewPosition"),
        photometric=photometric or None,
        dicom_tags=tags,
    )
    return out, info


def _dicom_colour_to_gray(rgb: np.ndarray, log: _Log) -> np.ndarray:
    """ITU-R 601-2 luminance; 8-bit stays 8-bit (rounded), deeper data is min..max scaled."""
    lum = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    log.add("RGB converted to luminance (ITU-R 601-2)")
    if rgb.dtype == np.uint8:
        return np.clip(np.rint(lum), 0, 255).astype(np.uint8)
    return _scale_minmax(lum, log, f"{rgb.dtype.itemsize * 8}-bit")


def _lut(item, ds) -> tuple[np.ndarray, int]:
    """(LUT entries, first input value mapped) of a Modality/VOI LUT Sequence item.

    Our own reader rather than pydicom's apply_voi/apply_modality_lut: pydicom 3.0 indexes the
    table with an array of the *entry* dtype (uint8 for an 8-bit VOI LUT, so inputs above 255
    wrap around) and cannot build e.g. 12-bit modality LUTs ("uint12").
    """
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries, first = (desc[0] or 2**16), desc[1]
    value = item["LUTData"].value
    if isinstance(value, (bytes, bytearray)):  # OW: raw words (8-bit tables: one byte per entry)
        if len(value) == n_entries:
            lut = np.frombuffer(value, dtype=np.uint8)
        else:
            little = ds.original_encoding[1] is not False
            lut = np.frombuffer(value, dtype=("<" if little else ">") + "u2")[:n_entries]
    elif isinstance(value, (list, tuple, MultiValue)):
        lut = np.asarray(list(value), dtype=np.int64)
    else:
        lut = np.asarray([value], dtype=np.int64)
    if lut.size == 0:
        raise ValueError("empty LUT Data")
    return lut.astype(np.int64), first


def _apply_lut(values: np.ndarray, lut: np.ndarray, first: int) -> np.ndarray:
    """Map ``values`` through ``lut``; inputs below/above the table take its first/last entry."""
    if first >= 2**15 and values.min() < 0:  # descriptor's 2nd value is SS for signed input
        first -= 2**16
    index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.intp)
    return lut[index]


def _window_output_range(ds) -> tuple[float, float]:
    """Output range of pydicom's windowing, so that the window maps exactly onto 0..255.

    Probed through pydicom itself (values far below / above the window) so it always matches
    pydicom's y_min/y_max convention (which depends on BitsStored, sign and rescale).
    """
    with np.errstate(over="ignore"):
        probe = apply_windowing(np.array([-1e30, 1e30], dtype=np.float64), ds, index=0)
    return float(np.min(probe)), float(np.max(probe))


def _dicom_gray_to_8bit(
    arr: np.ndarray, ds, photometric: str, bits_stored: int | None, log: _Log
) -> np.ndarray:
    """Modality LUT -> VOI LUT or window (or min..max) -> 8-bit -> MONOCHROME1 inversion."""
    raw_dtype = arr.dtype
    values: np.ndarray = arr
    has_modality = False
    modality_seq = ds.get("ModalityLUTSequence")
    if modality_seq:
        lut, first = _lut(modality_seq[0], ds)
        values = _apply_lut(arr, lut, first)
        has_modality = True
        log.add("modality LUT sequence applied")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        if (float(ds.RescaleSlope), float(ds.RescaleIntercept)) != (1.0, 0.0):
            values = apply_modality_lut(arr, ds)  # float64: value * slope + intercept
            has_modality = True
            log.add("modality rescale applied (slope and intercept)")

    gray8 = None
    voi_seq = ds.get("VOILUTSequence")
    try:
        if voi_seq and voi_seq[0].get("LUTDescriptor") and voi_seq[0].get("LUTData") is not None:
            lut, first = _lut(voi_seq[0], ds)
            gray8 = _scale_minmax(_apply_lut(values, lut, first), _Log(), "VOI LUT",
                                  float(lut.min()), float(lut.max()))
            log.add("VOI LUT sequence applied")
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            lo, hi = _window_output_range(ds)
            gray8 = _scale_minmax(apply_windowing(values, ds, index=0), _Log(), "window", lo, hi)
            center, width = _plain(ds.WindowCenter), _plain(ds.WindowWidth)
            log.add(f"VOI LUT window applied (center {center}, width {width})")
    except Exception as exc:  # e.g. width < 1, unknown VOI function, malformed LUT: fall back
        log.add(f"invalid VOI transform ignored ({exc})", changed=False)
        gray8 = None
    if gray8 is None:
        if not has_modality and raw_dtype.kind == "u" and (bits_stored or 16) <= 8:
            # 8-bit unsigned data is display-ready: pass it through unchanged, like an 8-bit PNG
            gray8 = np.clip(values, 0, 255).astype(np.uint8)
        else:
            depth = f"{bits_stored}-bit" if bits_stored else "DICOM"
            gray8 = _scale_minmax(values, log, depth)
    if photometric == "MONOCHROME1":
        gray8 = 255 - gray8
        log.add("MONOCHROME1 inverted")
    return gray8


# --------------------------------------------------------------------------------------------------
# Error messages for unrecognised data
# --------------------------------------------------------------------------------------------------

_KNOWN_NON_IMAGES: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF", 0, "a PDF document"),
    (b"PK\x03\x04", 0, "a zip archive (or .docx/.xlsx/.npz)"),
    (b"PK\x05\x06", 0, "an empty zip archive"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7z archive"),
    (b"Rar!", 0, "a RAR archive"),
    (b"\x93NUMPY", 0, "a NumPy .npy array"),
    (b"\x89HDF", 0, "an HDF5 file"),
)
_KNOWN_UNSUPPORTED_IMAGES: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF8", 0, "GIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xffO\xffQ", 0, "JPEG 2000 codestream"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"8BPS", 0, "Photoshop PSD"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
)


def _unrecognised(data: bytes, name: str | None) -> ImageLoadError:
    for magic, offset, what in _KNOWN_UNSUPPORTED_IMAGES:
        if data[offset : offset + len(magic)] == magic:
            return ImageLoadError(
                "unsupported", f"unsupported image format {what} (accepted: {_ACCEPTED_TEXT})", name
            )
    looks = None
    for magic, offset, what in _KNOWN_NON_IMAGES:
        if data[offset : offset + len(magic)] == magic:
            looks = what
            break
    if looks is None:
        head = data[:4096]
        stripped = head.lstrip().lower()
        if stripped.startswith((b"<svg", b"<?xml")) and b"<svg" in head.lower():
            return ImageLoadError(
                "unsupported", f"unsupported image format SVG (accepted: {_ACCEPTED_TEXT})", name
            )
        if stripped.startswith((b"<!doctype html", b"<html")):
            looks = "an HTML page"
        elif _is_text(head):
            looks = "text"
        else:
            looks = "unrecognised binary data"
    return ImageLoadError(
        "not_an_image",
        f"not an image: unrecognised format (looks like {looks}; accepted: {_ACCEPTED_TEXT})",
        name,
    )


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the 4096-byte boundary is still text
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    if not text:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t\f" for ch in text)
    return printable / len(text) > 0.95

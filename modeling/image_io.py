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
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .dicom import _has_dicom_magic, _load_dicom, _parse_dicom, _dicom_tags
from .image_base import (DICOM_METADATA_KEYS, MAX_PIXELS, REASONS, ImageInfo, ImageLoadError,  # noqa: F401
                         _bomb_error, _check_pixels, _Log, _mb, _scale_minmax)

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
    "WORKING_SIDE",
    "REASONS",
    "ImageInfo",
    "ImageLoadError",
    "load_image",
    "load_image_with_info",
    "pixel_sha256",
    "read_dicom_metadata",
]

#: Largest accepted file, in bytes, checked before reading (from ``stat`` for paths).  Looked up at
#: call time, so tests can monkeypatch it.
MAX_FILE_BYTES: int = 512 * 1024 * 1024

#: The working size of services (the Space, archive prediction, the private page): a film whose long
#: side is larger is reduced to it while decoding, bounding memory and time; the model sees 224 px.
WORKING_SIDE: int = 2048

#: Lower-case suffixes that directory readers should pick up.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom"}
)

# Pillow format names we accept (``Image.open(formats=...)``).  The JPEG opener also returns "MPO"
# images (JPEGs from cameras/phones that embed a second picture); those are reported as "JPEG".
_RASTER_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
_ACCEPTED_TEXT = "JPEG, PNG, TIFF, BMP, WebP or DICOM"

_MODES_8BIT_COLOUR = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_MODES_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;32", "I;32B", "I", "F")

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]


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


def save_pixels_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as an 8-bit grayscale PNG made from its pixels alone (no EXIF, ICC, text chunk
    or DICOM header can survive), atomically. How a film leaves the project once de-identified: the
    Space's stored feedback and the contributor validator's cleaned copy."""
    import uuid

    path = Path(path)
    clean = Image.frombytes("L", image.size, image.convert("L").tobytes())
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp")
    clean.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


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

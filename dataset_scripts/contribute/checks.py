"""Per-file checks: the frontal-film screen, metadata kinds, safe paths, pseudonyms, licences."""

from __future__ import annotations


import hashlib
import hmac
import io
import re
import secrets
from pathlib import Path

from PIL import Image

from modeling.image_io import ImageInfo
from modeling.quality import symmetry_problems, xray_problems


# --------------------------------------------------------------------------------------------------
# Per-file checks
# --------------------------------------------------------------------------------------------------

def chest_xray_warnings(img: Image.Image, info: ImageInfo, data: bytes | None = None) -> list[str]:
    """Warnings for images that do not look like a frontal chest X-ray.

    :func:`modeling.quality.xray_problems` (the rules the Space applies: gray, a radiograph, chest,
    not lateral by DICOM tags, not tiny, a film-like aspect ratio, not flat), so contributor and Space
    agree, plus a left-right symmetry check: a frontal chest is roughly symmetric (spine in the
    middle, a lung each side); a lateral film without DICOM tags, a hand or a screenshot mostly is
    not. Limits: a symmetric non-chest image (skull, pelvis, frontal abdomen) passes; about 1% of
    real frontal films (rotated patients, large one-sided consolidations) get a symmetry warning.
    Warnings do not block: the maintainer looks at the flagged files in the PR.
    """
    return list(xray_problems(img, info, data)) + symmetry_problems(img)


_METADATA_KINDS = {"exif": "EXIF", "icc_profile": "ICC profile", "xmp": "XMP", "XML:com.adobe.xmp": "XMP",
                   "comment": "comment", "photoshop": "Photoshop block", "iptc": "IPTC"}
_TECHNICAL_INFO = frozenset({"dpi", "jfif", "jfif_version", "jfif_unit", "jfif_density", "progressive",
                             "progression", "gamma", "aspect", "compression", "interlace", "transparency",
                             "adobe", "adobe_transform", "srgb", "chromaticity", "mp", "mpoffset"})


def _raster_metadata(data: bytes, info: ImageInfo) -> list[str]:
    """Kinds of metadata a raster file carries (EXIF, XMP, ICC, comments, text chunks): all are
    dropped by the re-encode, and the report says which kinds were there. Never contents, and never
    a text chunk's own keyword (the writer chose it; it could be a name): those are "text chunk"."""
    if info.is_dicom:
        return []
    try:
        with Image.open(io.BytesIO(data), formats=[info.format]) as im:
            kinds = {_METADATA_KINDS.get(str(k), "text chunk") for k in im.info if str(k) not in _TECHNICAL_INFO}
            if im.getexif():
                kinds.add("EXIF")
    except Exception:
        return []
    return sorted(kinds)


def _safe_path(root: Path, rel: str) -> tuple[Path | None, str]:
    """The file a manifest path names, or (None, why it is refused). Absolute paths, ``..``, symlinks
    and anything resolving outside the submission folder are refused: the manifest must not make the
    validator read (and then upload) a file from elsewhere on the contributor's machine."""
    if not rel:
        return None, "empty path"
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        return None, "unsafe path: absolute paths are not allowed"
    if ".." in p.parts or ".." in rel.replace("\\", "/").split("/"):
        return None, "unsafe path: '..' is not allowed"
    full = root / p
    cur = root
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            return None, "unsafe path: symbolic links are not allowed"
    if not full.exists():
        return None, "file not found"
    if not full.is_file():
        return None, "not a regular file"
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        return None, "unsafe path: outside the submission folder"
    return full, ""


def _pseudonymiser():
    """patient_id -> ``p-<12 hex>``: HMAC with a random key that is never stored, so ids stay equal
    within one submission (the build groups a patient's images) but cannot be traced back or linked
    across submissions."""
    key = secrets.token_bytes(32)
    return lambda pid: "p-" + hmac.new(key, pid.encode(), hashlib.sha256).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24]

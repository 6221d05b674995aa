"""DICOM: decoding pixel data to the loader's 8-bit grayscale, reading technical tags, and the
de-identification policy (which tags identify a patient).

Pixel rules (the module docstring of :mod:`modeling.image_io` has the project-wide contract): the
Modality LUT (rescale slope/intercept) first, then the VOI LUT (VOI LUT Sequence, else Window
Center/Width, first view when several are given), honoured as the acquisition intended; without a
VOI transform 8-bit unsigned data passes through and anything else is min..max scaled; MONOCHROME1
is inverted last; the first frame of a multi-frame object; colour to luminance.

De-identification: images leave this project as pixels only (no header survives), so the policy is
about *telling* people what was removed: :data:`IDENTIFYING_DICOM_KEYWORDS` and
:func:`identifying_tags` name the identifying attributes present in a file, never their values. The
contributor validator reports them and the Space notes them.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from decimal import Decimal
from typing import Any

import numpy as np
import pydicom
from PIL import Image
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

from .image_base import (DICOM_METADATA_KEYS, ImageInfo, ImageLoadError, _check_pixels, _Log,  # noqa: F401
                         _scale_minmax)



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


# ---- de-identification policy ------------------------------------------------------------------

# DICOM attributes that identify a patient, an encounter or a place (after DICOM PS3.15 Annex E,
# basic profile). Every tag is dropped anyway (pixels only); this list only decides which tag
# *names* the report shows as "identifying tags removed" and which values must not reappear in the
# manifest note. Any person name (VR PN), date/time (DA/DT/TM), patient-module element (group 0010)
# and private tag counts as identifying too.
IDENTIFYING_DICOM_KEYWORDS = frozenset({
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "MediaStorageSOPInstanceUID", "FrameOfReferenceUID", "StudyDescription",
    "SeriesDescription", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "AdmissionID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "MilitaryRank", "EthnicGroup", "Occupation", "AdditionalPatientHistory",
    "PatientComments", "ImageComments", "ContentCreatorName", "InstanceCreatorUID", "IrradiationEventUID",
})
_IDENTIFYING_VRS = frozenset({"PN", "DA", "DT", "TM"})


def identifying_tags(data: bytes) -> tuple[list[str], list[str], str | None]:
    """(names of the identifying tags present, their values as text, BurnedInAnnotation).

    The values are for an in-memory check only (that the manifest note does not repeat them); they
    are never written anywhere. Names are keywords, or ``(gggg,eeee)`` for private/unknown tags."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed elements (pydicom parses lazily): take what is readable
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            elements = list(ds.iterall())
            if getattr(ds, "file_meta", None) is not None:
                elements += list(ds.file_meta)
            burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() or None
        except Exception:
            return [], [], None
        names, values = set(), []
        for el in elements:
            kw = el.keyword or ""
            identifying = (el.tag.is_private or el.tag.group == 0x0010 or el.VR in _IDENTIFYING_VRS
                           or kw in IDENTIFYING_DICOM_KEYWORDS)
            if not identifying or el.VR == "SQ" or el.tag.element == 0:  # (gggg,0000): a group length
                continue
            names.add(kw if kw and not el.tag.is_private else f"({el.tag.group:04X},{el.tag.element:04X})")
            try:
                v = el.value
                for part in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]):
                    text = str(part).strip()
                    if isinstance(part, (str, pydicom.valuerep.PersonName)) and len(text) >= 3:
                        values.append(text)
                        if el.VR == "PN":  # "Doe^Jane": each name on its own too
                            values.extend(p for p in re.split(r"[\^=\s]+", text) if len(p) >= 3)
            except Exception:
                pass
    return sorted(names), values, burned

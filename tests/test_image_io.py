"""Tests for modeling.image_io, the single image loader used by every entry point.

Fixtures are generated in memory / tmp_path (tiny, synthetic).  The real DICOM and Kermany files
are read from the shared read-only data folder next to the repository and never copied.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile, features
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEGBaseline8Bit,
    HTJ2KLossless,
)

from modeling import image_io
from modeling.image_io import (
    DICOM_METADATA_KEYS,
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    REASONS,
    ImageInfo,
    ImageLoadError,
    load_image,
    load_image_with_info,
    read_dicom_metadata,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DICOM_DIR = SHARED / "data" / "dicom"
KERMANY_DIR = SHARED / "data" / "kermany-fullres-sample"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

H, W = 16, 32
# smooth 8-bit test pattern (smooth so that lossy JPEG stays close): 0..232, all rows distinct
GRAY = np.clip(np.arange(W)[None, :] * 7 + np.arange(H)[:, None], 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def arr(img: Image.Image) -> np.ndarray:
    assert img.mode == "L"
    return np.asarray(img)


def gray_palette_image(values: np.ndarray) -> Image.Image:
    img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    img.putpalette(bytes(c for v in range(256) for c in (v, v, v)))
    return img


def alpha_mask() -> np.ndarray:
    """Opaque left half, transparent right quarter, half-transparent (128) in between."""
    a = np.full((H, W), 255, dtype=np.uint8)
    a[:, W // 2 : 3 * W // 4] = 128
    a[:, 3 * W // 4 :] = 0
    return a


def composited_on_black(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(float) * alpha / 255.0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Pillow's exact fixed-point ITU-R 601-2 transform."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def make_case(mode: str) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
    """(image in `mode`, expected 8-bit output, tolerance mask for half-transparent pixels)."""
    g = GRAY
    half = alpha_mask() == 128
    if mode == "L":
        return Image.fromarray(g), g, None
    if mode == "RGB":
        return Image.fromarray(np.dstack([g, g, g])), g, None
    if mode == "RGBA":
        a = alpha_mask()
        return Image.fromarray(np.dstack([g, g, g, a]), "RGBA"), composited_on_black(g, a), half
    if mode == "LA":
        a = alpha_mask()
        return Image.fromarray(np.dstack([g, a]), "LA"), composited_on_black(g, a), half
    if mode == "P":
        return gray_palette_image(g), g, None
    if mode == "P+transparency":
        img = gray_palette_image(g)
        img.info["transparency"] = 200
        assert (g == 200).any()
        return img, np.where(g == 200, 0, g), None
    if mode == "1":
        return Image.fromarray(g > 127), np.where(g > 127, 255, 0), None
    if mode == "CMYK":
        return Image.fromarray(g).convert("CMYK"), g, None
    raise AssertionError(mode)


# --------------------------------------------------------------------------------------------------
# 8-bit raster formats and modes
# --------------------------------------------------------------------------------------------------

LOSSLESS_CASES = [
    ("PNG", "L"),
    ("PNG", "LA"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "P+transparency"),
    ("PNG", "1"),
    ("TIFF", "L"),
    ("TIFF", "LA"),
    ("TIFF", "RGB"),
    ("TIFF", "RGBA"),
    ("TIFF", "P"),
    ("TIFF", "CMYK"),
    ("BMP", "L"),
    ("BMP", "RGB"),
    ("BMP", "P"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
]


@pytest.mark.parametrize(("fmt", "mode"), LOSSLESS_CASES)
def test_lossless_8bit_modes_give_exact_gray(fmt: str, mode: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    img, expected, tolerant = make_case(mode)
    kw = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    data = encode(img, fmt, **kw)
    stored_mode = Image.open(io.BytesIO(data)).mode

    out, info = load_image_with_info(data)

    assert out.mode == "L" and out.size == (W, H)
    assert (info.format, info.mode, info.width, info.height) == (fmt, stored_mode, W, H)
    assert info.is_dicom is False and info.bits == (1 if stored_mode == "1" else 8)
    assert info.converted is (stored_mode != "L")
    got = arr(out).astype(int)
    if tolerant is None:
        np.testing.assert_array_equal(got, expected)
    else:  # half-transparent pixels: Pillow's blend may round the other way
        np.testing.assert_array_equal(got[~tolerant], expected[~tolerant])
        assert np.abs(got[tolerant] - expected[tolerant]).max() <= 1


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes(mode: str) -> None:
    img, expected, _ = make_case(mode)
    data = encode(img, "JPEG", quality=95)
    out, info = load_image_with_info(data)
    assert out.mode == "L" and out.size == (W, H)
    assert info.format == "JPEG" and info.mode == mode
    assert np.abs(arr(out).astype(int) - expected).mean() < 3


def test_rgb_colour_uses_luminance_not_a_channel() -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, 0] = (255, 0, 0)
    rgb[:, 1] = (0, 255, 0)
    rgb[:, 2] = (0, 0, 255)
    rgb[:, 3] = (255, 255, 255)
    rgb[:, 4] = (10, 200, 30)
    out, info = load_image_with_info(encode(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(arr(out), luminance(rgb))
    assert arr(out)[0, :4].tolist() == [76, 150, 29, 255]
    assert info.notes == ("RGB converted to luminance (ITU-R 601-2)",)


def test_fully_opaque_alpha_is_dropped_not_composited() -> None:
    rgba = np.dstack([GRAY, GRAY, GRAY, np.full_like(GRAY, 255)])
    out, info = load_image_with_info(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(arr(out), GRAY)
    assert "RGBA alpha channel (fully opaque) dropped" in info.notes


def test_transparent_pixels_become_black_even_if_their_colour_is_white() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[0, 0, 3] = 255  # only the top-left pixel is visible
    out, info = load_image_with_info(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert arr(out).tolist() == [[255, 0], [0, 0]]
    assert "RGBA flattened onto black" in info.notes


def test_multipage_tiff_uses_first_page() -> None:
    pages = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (10, 20, 30)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    out, info = load_image_with_info(buf.getvalue())
    assert arr(out).tolist() == [[10] * 4] * 4
    assert info.n_frames == 3 and "first of 3 frames used" in info.notes
    assert info.converted is False


# --------------------------------------------------------------------------------------------------
# 16-bit / 32-bit / float
# --------------------------------------------------------------------------------------------------

RAMP12 = np.tile(np.arange(4096, dtype=np.uint16), (3, 1))  # 12-bit data in a 16-bit container
RAMP12_8BIT = np.rint(RAMP12.astype(np.float64) * 255 / 4095).astype(np.uint8)


@pytest.mark.parametrize(
    ("fmt", "dtype", "stored_mode"),
    [("PNG", "<u2", "I;16"), ("TIFF", "<u2", "I;16"), ("TIFF", ">u2", "I;16B")],
)
def test_16bit_uses_full_range_and_keeps_order(fmt: str, dtype: str, stored_mode: str) -> None:
    data = encode(Image.fromarray(RAMP12.astype(dtype)), fmt)
    out, info = load_image_with_info(data)
    got = arr(out)

    assert (info.format, info.mode, info.bits) == (fmt, stored_mode, 16)
    assert got.min() == 0 and got.max() == 255  # 0..4095 spans the whole 8-bit range
    assert (np.diff(got.astype(int), axis=1) >= 0).all()  # the gradient stays monotonic
    assert len(np.unique(got)) == 256
    np.testing.assert_array_equal(got, RAMP12_8BIT)  # exactly round(v * 255 / 4095)
    assert info.converted and "16-bit rescaled to 8-bit (min..max 0..4095)" in info.notes
    # the naive conversion this module exists to avoid: Pillow clips 16-bit values to 0..255
    assert np.asarray(Image.open(io.BytesIO(data)).convert("L")).max() == 255
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("L")) == 255).mean() > 0.9


def test_16bit_narrow_range_is_stretched() -> None:
    values = np.tile(np.arange(1000, 1011, dtype=np.uint16), (2, 1))
    got = arr(load_image(encode(Image.fromarray(values), "PNG")))
    np.testing.assert_array_equal(got[0], np.rint(np.arange(11) * 25.5).astype(np.uint8))


def test_constant_16bit_image_is_black_not_an_error() -> None:
    constant = Image.fromarray(np.full((3, 3), 700, np.uint16))
    out, info = load_image_with_info(encode(constant, "PNG"))
    assert arr(out).max() == 0 and any("constant" in n for n in info.notes)


def test_32bit_signed_tiff() -> None:
    values = np.tile(np.linspace(-1000, 3000, 41).astype(np.int32), (2, 1))
    out, info = load_image_with_info(encode(Image.fromarray(values), "TIFF"))
    assert (info.mode, info.bits) == ("I", 32)
    expected = np.rint((values + 1000) * 255 / 4000).astype(np.uint8)
    np.testing.assert_array_equal(arr(out), expected)


def test_float_tiff_with_non_finite_values() -> None:
    values = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (2, 1))
    values[1, 5] = np.nan
    out, info = load_image_with_info(encode(Image.fromarray(values), "TIFF"))
    assert info.mode == "F"
    got = arr(out)
    np.testing.assert_array_equal(got[0], np.rint(np.linspace(0, 255, 11)).astype(np.uint8))
    assert got[1, 5] == 0 and "non-finite values set to black" in info.notes


# --------------------------------------------------------------------------------------------------
# EXIF orientation, metadata stripping
# --------------------------------------------------------------------------------------------------


def with_orientation(img: Image.Image, fmt: str, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif, **kw)


EXIF_DISPLAY = {  # orientation -> what the viewer shows, per the EXIF specification
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(EXIF_DISPLAY))
def test_exif_orientation_is_applied(orientation: int) -> None:
    data = with_orientation(Image.fromarray(GRAY), "PNG", orientation)
    out, info = load_image_with_info(data)
    np.testing.assert_array_equal(arr(out), EXIF_DISPLAY[orientation](GRAY))
    assert (info.width, info.height) == out.size
    assert f"EXIF orientation {orientation} applied" in info.notes and info.converted


def test_exif_orientation_jpeg_swaps_size() -> None:
    out, info = load_image_with_info(with_orientation(Image.fromarray(GRAY), "JPEG", 6))
    assert out.size == (H, W) and (info.width, info.height) == (H, W)


def test_returned_image_carries_no_metadata() -> None:
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("PatientName", "Doe^Jane")
    exif = Image.Exif()
    exif[0x010E] = "Doe^Jane"  # ImageDescription
    data = encode(Image.fromarray(GRAY), "PNG", pnginfo=text, exif=exif)
    assert Image.open(io.BytesIO(data)).info  # the input does carry it
    out = load_image(data)
    assert out.info == {} and dict(out.getexif()) == {}


# --------------------------------------------------------------------------------------------------
# input types
# --------------------------------------------------------------------------------------------------


def test_path_bytes_and_file_objects_give_identical_results(tmp_path: Path) -> None:
    data = encode(Image.fromarray(RAMP12), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        from_fh = load_image(fh).tobytes()
    results = [
        load_image(data).tobytes(),
        load_image(bytearray(data)).tobytes(),
        load_image(memoryview(data)).tobytes(),
        load_image(str(path)).tobytes(),
        load_image(path).tobytes(),
        load_image(io.BytesIO(data)).tobytes(),
        from_fh,
    ]
    assert all(r == results[0] for r in results)
    assert results[0] == RAMP12_8BIT.tobytes()


def test_bad_source_types() -> None:
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary"):
        load_image(io.StringIO("hello"))  # type: ignore[arg-type]


def test_missing_file_is_an_os_error_not_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------------------------------
# bad input: reasons and messages
# --------------------------------------------------------------------------------------------------


def test_image_load_error_api() -> None:
    err = ImageLoadError("truncated", "truncated or corrupt JPEG", "a.jpg")
    assert isinstance(err, ValueError)
    assert (err.reason, err.detail, err.name, str(err)) == (
        "truncated",
        "truncated or corrupt JPEG",
        "a.jpg",
        "a.jpg: truncated or corrupt JPEG",
    )
    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, str(again)) == (err.reason, str(err))
    assert str(ImageLoadError("empty", "empty file (0 bytes)")) == "empty file (0 bytes)"
    with pytest.raises(ValueError, match="unknown ImageLoadError reason"):
        ImageLoadError("bogus", "x")
    assert set(REASONS) >= {"empty", "truncated", "not_an_image", "too_large", "no_pixel_data",
                            "unsupported"}


def test_empty_bytes_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError) as exc:
        load_image(b"")
    assert exc.value.reason == "empty" and str(exc.value) == "empty file (0 bytes)"
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert exc.value.reason == "empty" and str(exc.value) == f"{path}: empty file (0 bytes)"


def noisy_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), "JPEG",
                  quality=95)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg(tmp_path: Path, cut: float) -> None:
    data = noisy_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert exc.value.reason == "truncated"
    assert str(exc.value).startswith(f"{path}: truncated or corrupt JPEG")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_jpeg_cut_inside_its_header() -> None:
    with pytest.raises(ImageLoadError) as exc:
        load_image(noisy_jpeg()[:40])
    assert exc.value.reason == "truncated" and "JPEG" in exc.value.detail


def test_truncated_png() -> None:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8)),
                  "PNG")
    with pytest.raises(ImageLoadError) as exc:
        load_image(data[: len(data) // 2])
    assert exc.value.reason == "truncated" and "PNG" in exc.value.detail


def test_load_truncated_images_switch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the module did not flip it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(noisy_jpeg())


def make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("xray.png", encode(Image.fromarray(GRAY), "PNG"))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (np.random.default_rng(3).bytes(4096), "unrecognised binary data"),
        (b"patient,label\nx,1\n" * 20, "text"),
        ("Röntgenbild – kein Bild\n".encode() * 10, "text"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML page"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "a PDF document"),
        (make_zip(), "a zip archive"),
        (b"BMW is not a bitmap, even though it starts with BM", "text"),
    ],
)
def test_not_an_image(data: bytes, looks_like: str) -> None:
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert exc.value.reason == "not_an_image"
    assert exc.value.detail.startswith("not an image: unrecognised format (looks like ")
    assert looks_like in exc.value.detail


def test_text_file_message_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a chest x-ray\n")
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert exc.value.reason == "not_an_image" and exc.value.name == str(path)
    assert str(exc.value).startswith(f"{path}: not an image")


def test_known_but_unsupported_format() -> None:
    with pytest.raises(ImageLoadError) as exc:
        load_image(encode(Image.fromarray(GRAY), "GIF"))
    assert exc.value.reason == "unsupported"
    assert exc.value.detail.startswith("unsupported image format GIF")


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims another size: decoding it would fail."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_huge_png_header_is_refused_before_decoding() -> None:
    # 900 MP: beyond Pillow's own bomb limit, which Image.open raises; reported as too_large
    with pytest.raises(ImageLoadError) as exc:
        load_image(png_claiming(30000, 30000))
    assert exc.value.reason == "too_large"
    assert exc.value.detail == "image too large: 900.0 MP exceeds the 50 MP limit"
    # 81 MP: below Pillow's limit, refused by our header check (decoding would say "truncated")
    with pytest.raises(ImageLoadError) as exc:
        load_image(png_claiming(9000, 9000))
    assert exc.value.reason == "too_large"
    assert exc.value.detail == "image too large: 9000x9000 = 81.0 MP exceeds the 50 MP limit"
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # global left untouched


def test_max_pixels_argument() -> None:
    data = encode(Image.fromarray(np.zeros((100, 200), np.uint8)), "PNG")
    assert load_image(data, max_pixels=20_000).size == (200, 100)
    with pytest.raises(ImageLoadError) as exc:
        load_image(data, max_pixels=19_999)
    assert exc.value.reason == "too_large" and "200x100" in exc.value.detail
    assert MAX_PIXELS == 50_000_000


def test_file_size_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(image_io, "MAX_FILE_BYTES", 1000)
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64), np.uint8)),
                  "PNG")
    assert len(data) > 1000
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(ImageLoadError) as exc:
            load_image(source)
        assert exc.value.reason == "too_large" and exc.value.detail.startswith("file too large")


def test_image_extensions() -> None:
    assert IMAGE_EXTENSIONS == {
        ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom"
    }
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# synthetic DICOM
# --------------------------------------------------------------------------------------------------

from synthetic import PATIENT, make_dicom  # noqa: E402  (shared with the Space and validator tests)


def test_dicom_12bit_rescale_and_window() -> None:
    data = make_dicom(RAMP12, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                      WindowCenter=1000, WindowWidth=2000)
    out, info = load_image_with_info(data)
    got = arr(out).astype(int)

    hu = RAMP12.astype(float) * 2 - 1024
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window, mapped onto 0..255
    expected = np.clip((hu - 999.5) / 1999 + 0.5, 0, 1) * 255
    assert np.abs(got - expected).max() <= 0.5 + 1e-6
    assert (got[hu <= 0] == 0).all() and (got[hu > 1999] == 255).all()
    assert (np.diff(got, axis=1) >= 0).all()
    assert (info.format, info.mode, info.bits, info.is_dicom) == ("DICOM", "MONOCHROME2 12-bit", 12,
                                                                   True)
    assert info.notes == (
        "modality rescale applied (slope and intercept)",
        "VOI LUT window applied (center 1000.0, width 2000.0)",
    )
    assert (info.modality, info.body_part, info.view_position, info.photometric) == (
        "CR", "CHEST", "PA", "MONOCHROME2")


def test_dicom_without_window_is_minmax_scaled_and_monochrome1_inverted() -> None:
    m2, info2 = load_image_with_info(make_dicom(RAMP12, bits_stored=12))
    m1, info1 = load_image_with_info(make_dicom(RAMP12, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(arr(m2), RAMP12_8BIT)
    np.testing.assert_array_equal(arr(m1), 255 - RAMP12_8BIT)
    assert info1.mode == "MONOCHROME1 12-bit" and info1.notes[-1] == "MONOCHROME1 inverted"
    assert info2.notes == ("12-bit rescaled to 8-bit (min..max 0..4095)",)


def test_dicom_voi_lut_sequence() -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])  # LUTDescriptor: 4096 entries, first 0, 8 bits
    item.add_new(0x00283006, "US", (np.arange(4096) // 16).tolist())  # LUTData
    data = make_dicom(RAMP12, bits_stored=12, WindowCenter=100, WindowWidth=10,
                      VOILUTSequence=pydicom.Sequence([item]))
    out, info = load_image_with_info(data)
    np.testing.assert_array_equal(arr(out), (RAMP12 // 16).astype(np.uint8))  # LUT wins
    assert "VOI LUT sequence applied" in info.notes


def test_dicom_modality_lut_sequence_12bit() -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # 12-bit entries (pydicom 3.0 cannot do these)
    item.add_new(0x00283006, "US", (4095 - np.arange(4096)).tolist())  # an inverting LUT
    data = make_dicom(RAMP12, bits_stored=12, ModalityLUTSequence=pydicom.Sequence([item]))
    out, info = load_image_with_info(data)
    np.testing.assert_array_equal(arr(out), 255 - RAMP12_8BIT)
    assert info.notes[0] == "modality LUT sequence applied"


def test_dicom_8bit_passes_through_unchanged() -> None:
    out, info = load_image_with_info(make_dicom(GRAY))
    np.testing.assert_array_equal(arr(out), GRAY)
    assert info.converted is False and info.notes == ()


def test_dicom_signed_16bit() -> None:
    values = np.tile(np.arange(-2000, 2001, 500, dtype=np.int16), (2, 1))
    out = load_image(make_dicom(values, bits_stored=16))
    np.testing.assert_array_equal(arr(out)[0], np.rint(np.arange(9) * 255 / 8).astype(np.uint8))


def test_dicom_multiframe_uses_first_frame() -> None:
    frames = np.stack([GRAY, 255 - GRAY, np.zeros_like(GRAY)])
    out, info = load_image_with_info(make_dicom(frames))
    np.testing.assert_array_equal(arr(out), GRAY)
    assert info.n_frames == 3 and "first of 3 frames used" in info.notes


def test_dicom_rgb() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rgb[1] = [(255, 255, 255), (0, 0, 0), (100, 100, 100)]
    out = load_image(make_dicom(rgb, photometric="RGB"))
    assert arr(out).tolist() == [[76, 150, 29], [255, 0, 100]]


def test_dicom_headerless_matches_headered() -> None:
    with_header = load_image_with_info(make_dicom(RAMP12, bits_stored=12, WindowCenter=2000,
                                                  WindowWidth=1000))
    without = load_image_with_info(make_dicom(RAMP12, bits_stored=12, WindowCenter=2000,
                                              WindowWidth=1000, header=False))
    assert with_header[0].tobytes() == without[0].tobytes()
    assert without[1].notes[0] == "no transfer syntax in file; Implicit VR Little Endian assumed"


def test_rle_compressed_dicom_decodes_to_the_uncompressed_pixels_with_the_fast_decoder() -> None:
    """Archives store compressed DICOM; RLE Lossless decoded by pydicom's own pure-Python decoder took
    ~260 ms of a 2800x2800 film here, pylibjpeg-rle ~35 ms (benchmarks/archive.py). The requirements
    install it, pydicom picks it first, and the pixels are the uncompressed film's, bit for bit."""
    from pydicom.pixels.decoders import RLELosslessDecoder
    from pydicom.uid import RLELossless

    plain = make_dicom(RAMP12, bits_stored=12, WindowCenter=2000, WindowWidth=1000)
    ds = pydicom.dcmread(io.BytesIO(plain))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() != plain
    assert load_image(buf.getvalue()).tobytes() == load_image(plain).tobytes()
    assert "pylibjpeg" in RLELosslessDecoder.available_plugins


def test_dicom_patient_data_never_leaves() -> None:
    data = make_dicom(GRAY, **PATIENT)
    assert b"Doe^Jane" in data and b"PID-12345" in data
    out, info = load_image_with_info(data)
    meta = read_dicom_metadata(data)

    assert out.info == {}
    assert set(meta) == set(DICOM_METADATA_KEYS)
    assert meta["Modality"] == "CR" and meta["BodyPartExamined"] == "CHEST"
    assert meta["SOPClassName"] == "Computed Radiography Image Storage"
    assert (meta["Rows"], meta["Columns"], meta["BitsStored"]) == (H, W, 8)
    assert dict(info.dicom_tags) == meta
    for text in (repr(meta), repr(info)):
        for value in PATIENT.values():
            assert value not in text and value.split("^")[0] not in text


def test_dicom_without_pixel_data() -> None:
    data = make_dicom(None, **PATIENT)
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert exc.value.reason == "no_pixel_data"
    assert exc.value.detail == (
        "DICOM has no pixel data (SOP class: Computed Radiography Image Storage)"
    )
    assert read_dicom_metadata(data)["Modality"] == "CR"  # metadata still readable


def test_dicom_too_large_checked_from_header() -> None:
    with pytest.raises(ImageLoadError) as exc:
        load_image(make_dicom(GRAY), max_pixels=W * H - 1)
    assert exc.value.reason == "too_large" and f"{W}x{H}" in exc.value.detail


def test_dicom_truncated_pixel_data() -> None:
    data = make_dicom(RAMP12, bits_stored=12)
    with pytest.raises(ImageLoadError) as exc:
        load_image(data[: len(data) - 1000])
    assert exc.value.reason == "truncated" and "DICOM" in exc.value.detail


def with_encapsulated_frame(data: bytes, transfer_syntax: str, frame: bytes) -> bytes:
    """Re-save a DICOM with one encapsulated (compressed) frame under `transfer_syntax`."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_jpeg_baseline_compressed() -> None:
    jpeg = encode(Image.fromarray(GRAY), "JPEG", quality=95)
    data = with_encapsulated_frame(make_dicom(GRAY), JPEGBaseline8Bit, jpeg)
    out, info = load_image_with_info(data)
    assert out.size == (W, H) and info.dicom_tags["TransferSyntaxUID"] == JPEGBaseline8Bit
    assert np.abs(arr(out).astype(int) - GRAY).mean() < 3
    # the same data cut short is corrupt, not "unsupported"
    corrupt = with_encapsulated_frame(make_dicom(GRAY), JPEGBaseline8Bit, jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageLoadError) as exc:
        load_image(corrupt)
    assert exc.value.reason == "truncated"
    assert exc.value.detail.startswith("truncated or corrupt DICOM pixel data")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_dicom_cut_inside_compressed_pixel_data() -> None:
    jpeg = encode(Image.fromarray(GRAY), "JPEG", quality=95)
    data = with_encapsulated_frame(make_dicom(GRAY), JPEGBaseline8Bit, jpeg)
    with pytest.raises(ImageLoadError) as exc:
        load_image(data[: len(data) - len(jpeg) // 2])
    assert exc.value.reason == "truncated" and "DICOM" in exc.value.detail


def test_dicom_cut_before_pixel_data() -> None:
    data = make_dicom(RAMP12, bits_stored=12)
    pixel_tag = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    with pytest.raises(ImageLoadError) as exc:
        load_image(data[:pixel_tag])
    assert exc.value.reason == "truncated"
    assert exc.value.detail == (
        "truncated DICOM: image attributes (Rows/Columns) present but no Pixel Data"
    )


def test_dicom_transfer_syntax_without_decoder() -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder (pylibjpeg-openjpeg) is installed")
    data = with_encapsulated_frame(make_dicom(GRAY), HTJ2KLossless, b"\xffO\xffQ" + bytes(64))
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert exc.value.reason == "unsupported"
    assert exc.value.detail == (
        "unsupported DICOM transfer syntax High-Throughput JPEG 2000 Image Compression (Lossless "
        f"Only) ({HTJ2KLossless}): cannot decode its pixel data here (install pylibjpeg>=2.0 and "
        "pylibjpeg-openjpeg>=2.0)"
    )


def test_dicom_unknown_transfer_syntax() -> None:
    data = with_encapsulated_frame(make_dicom(GRAY), "1.2.3.4.5.6", b"\x00" * 64)
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert exc.value.reason == "unsupported"
    assert exc.value.detail.endswith(
        "(1.2.3.4.5.6): cannot decode its pixel data here "
        "(pydicom has no decoder for this transfer syntax)"
    )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["png16", "jpeg", "tiff", "dicom", "dicom_headerless"])
def test_damaged_inputs_only_ever_raise_image_load_error(kind: str) -> None:
    """Randomly damaged files must fail with ImageLoadError (or still load), nothing else."""
    seed = {
        "png16": lambda: encode(Image.fromarray(RAMP12), "PNG"),
        "jpeg": lambda: encode(Image.fromarray(GRAY), "JPEG"),
        "tiff": lambda: encode(Image.fromarray(GRAY), "TIFF"),
        "dicom": lambda: make_dicom(RAMP12, bits_stored=12, WindowCenter=900, WindowWidth=300),
        "dicom_headerless": lambda: make_dicom(GRAY, header=False),
    }[kind]()
    rng = np.random.default_rng(42)
    for _ in range(60):
        damaged = bytearray(seed)
        if rng.random() < 0.5:
            damaged = damaged[: rng.integers(0, len(damaged))]
        else:
            for _ in range(rng.integers(1, 8)):
                damaged[rng.integers(0, len(damaged))] = rng.integers(0, 256)
        try:
            out = load_image(bytes(damaged), max_pixels=1_000_000)
        except ImageLoadError as err:
            assert err.reason in REASONS
        else:
            assert out.mode == "L"


def test_read_dicom_metadata_rejects_non_dicom() -> None:
    with pytest.raises(ImageLoadError) as exc:
        read_dicom_metadata(encode(Image.fromarray(GRAY), "PNG"))
    assert exc.value.reason == "not_dicom"


# --------------------------------------------------------------------------------------------------
# real files from the shared data folder
# --------------------------------------------------------------------------------------------------

REAL_DICOMS = {
    "txv_siim_cr_chest_pa_monochrome2_jpeg.dcm": ((1024, 1024), "MONOCHROME2 8-bit"),
    "txv_fake_monochrome1_jpeg.dcm": ((1024, 1024), "MONOCHROME1 8-bit"),
    "nhsx_nih_dx_chest_nofinding_uncompressed.dcm": ((1024, 1024), "MONOCHROME2 8-bit"),
    "dcmfx_fodicom_CR-MONO1-10-chest.dcm": ((440, 440), "MONOCHROME1 10-bit"),
    "nhsx_sample_OT_not_chest.dcm": ((512, 512), "MONOCHROME2 8-bit"),
}


def real_dicom(name: str) -> Path:
    if not DICOM_DIR.is_dir():
        pytest.skip(f"shared DICOM samples not available at {DICOM_DIR}")
    return DICOM_DIR / name


@pytest.mark.parametrize("name", sorted(REAL_DICOMS))
def test_real_dicoms_decode(name: str) -> None:
    size, mode = REAL_DICOMS[name]
    out, info = load_image_with_info(real_dicom(name))
    got = arr(out)
    assert out.size == size and (info.width, info.height) == size
    assert (info.format, info.mode, info.is_dicom) == ("DICOM", mode, True)
    assert got.std() > 20 and got.min() < 60 and got.max() > 200  # a real picture, not constant
    assert out.info == {}


def test_real_monochrome1_is_inverse_of_its_monochrome2_twin() -> None:
    m2 = arr(load_image(real_dicom("txv_siim_cr_chest_pa_monochrome2_jpeg.dcm"))).astype(float)
    m1, info = load_image_with_info(real_dicom("txv_fake_monochrome1_jpeg.dcm"))
    m1 = arr(m1).astype(float)
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] < -0.9
    assert np.abs(m1 - (255 - m2)).mean() < 1
    assert info.notes == ("MONOCHROME1 inverted",)


def test_real_uncompressed_8bit_dicom_is_passed_through() -> None:
    path = real_dicom("nhsx_nih_dx_chest_nofinding_uncompressed.dcm")
    raw = pydicom.dcmread(path).pixel_array
    out, info = load_image_with_info(path)
    np.testing.assert_array_equal(arr(out), raw)
    assert info.converted is False


def test_real_headerless_10bit_monochrome1() -> None:
    path = real_dicom("dcmfx_fodicom_CR-MONO1-10-chest.dcm")
    assert path.read_bytes()[128:132] != b"DICM"
    out, info = load_image_with_info(path)
    assert info.notes == (
        "no transfer syntax in file; Implicit VR Little Endian assumed",
        "VOI LUT window applied (center 550.0, width 1024.0)",
        "MONOCHROME1 inverted",
    )
    # independent reference: raw 10-bit values -> LINEAR window (c=550, w=1024) -> invert
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    raw = ds.pixel_array.astype(float)
    reference = 255 - np.clip((raw - 549.5) / 1023 + 0.5, 0, 1) * 255
    assert np.abs(arr(out) - reference).max() <= 0.5 + 1e-6
    # in display orientation the collimator/background (high raw values in MONOCHROME1) is dark
    assert arr(out)[raw >= np.percentile(raw, 99)].mean() < 30


def test_real_dicom_metadata_tells_chest_from_secondary_capture() -> None:
    cr = read_dicom_metadata(real_dicom("dcmfx_fodicom_CR-MONO1-10-chest.dcm"))
    ot = read_dicom_metadata(real_dicom("nhsx_sample_OT_not_chest.dcm"))
    dx = read_dicom_metadata(real_dicom("nhsx_nih_dx_chest_nofinding_uncompressed.dcm"))
    assert (cr["Modality"], cr["BodyPartExamined"], cr["ViewPosition"]) == ("CR", "CHEST", "PA")
    assert (cr["BitsStored"], cr["PhotometricInterpretation"]) == (10, "MONOCHROME1")
    assert (ot["Modality"], ot["SOPClassName"]) == ("OT", "Secondary Capture Image Storage")
    assert dx["Modality"] == "DX"
    # this file really carries patient tags; none of them may come back
    ds = pydicom.dcmread(real_dicom("nhsx_nih_dx_chest_nofinding_uncompressed.dcm"))
    assert str(ds.PatientName) and str(ds.PatientName) not in repr(dx)
    assert str(ds.PatientID) not in repr(dx)


def test_real_kermany_jpegs() -> None:
    if not KERMANY_DIR.is_dir():
        pytest.skip(f"shared Kermany sample not available at {KERMANY_DIR}")
    paths = sorted(KERMANY_DIR.rglob("*.jpeg"))
    assert paths
    modes = set()
    for path in paths:
        with Image.open(path) as ref:
            ref_size, ref_mode = ref.size, ref.mode
            ref_gray = np.asarray(ref.convert("L"))
        out, info = load_image_with_info(path)
        assert out.mode == "L" and out.size == ref_size and info.mode == ref_mode
        np.testing.assert_array_equal(arr(out), ref_gray)
        modes.add(ref_mode)
    assert modes == {"L", "RGB"}


def test_image_info_is_frozen() -> None:
    _, info = load_image_with_info(encode(Image.fromarray(GRAY), "PNG"))
    assert isinstance(info, ImageInfo)
    with pytest.raises(AttributeError):
        info.width = 1  # type: ignore[misc]


def test_max_side_reduces_large_images_jpeg_while_decoding():
    """A service's working size: a JPEG is decoded at a DCT fraction (never at full size), other formats
    are reduced right after decoding; small images are untouched; every reduction is noted."""
    import io as _io

    from modeling.image_io import load_image_with_info

    big = Image.fromarray((np.indices((3000, 4000)).sum(0) % 251).astype(np.uint8), "L")
    jpg, png = _io.BytesIO(), _io.BytesIO()
    big.save(jpg, format="JPEG", quality=90)
    big.save(png, format="PNG")
    img, info = load_image_with_info(jpg.getvalue(), max_side=900)
    assert img.size == (900, 675) and (info.width, info.height) == (900, 675) and info.converted
    assert any("DCT scaling" in n and "1000x750" in n for n in info.notes), info.notes
    assert any("reduced from 1000x750" in n for n in info.notes)
    img, info = load_image_with_info(png.getvalue(), max_side=900)
    assert img.size == (900, 675) and any("reduced from 4000x3000" in n for n in info.notes)
    full, info = load_image_with_info(jpg.getvalue())
    assert full.size == (4000, 3000) and not info.notes
    small = _io.BytesIO()
    big.resize((400, 300)).save(small, format="PNG")
    img, info = load_image_with_info(small.getvalue(), max_side=900)
    assert img.size == (400, 300) and not info.converted
    with pytest.raises(ValueError, match="max_side"):
        load_image_with_info(small.getvalue(), max_side=4)

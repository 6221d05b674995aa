"""Synthetic images and sources for tests: smooth random fields stand in for X-rays (distinct seeds
give unrelated images, ~128 of 256 phash bits apart), and files are planted as needed."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid


def xray_like(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A deterministic smooth grayscale image with structure at several scales."""
    rng = np.random.default_rng(seed)
    img = np.zeros(size[::-1], dtype=np.float64)
    for cells, weight in ((6, 1.0), (16, 0.5), (40, 0.25)):
        coarse = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32), mode="F")
        img += weight * np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    img = (img - img.min()) / (img.max() - img.min()) * 235 + 10
    return Image.fromarray(img.astype(np.uint8), mode="L")


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A syntactically valid PNG whose header claims a huge image (a decompression bomb's signature);
    only the header is real, so nothing large is ever allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sixteen_bit(img: Image.Image) -> Image.Image:
    """The same picture as 16-bit data using 0..4095 (12-bit detector range)."""
    a = np.asarray(img, dtype=np.uint16) * 16
    return Image.fromarray(a.astype(np.uint16), mode="I;16")


def make_mini_sources(root: Path) -> Path:
    """Kermany layout + a folders source with planted copies, leaks, a conflict and bad files.
    The expected outcome is worked out in tests/test_build_synthetic.py."""
    k = root / "kermany" / "chest_xray"
    img = {name: xray_like(seed) for seed, name in enumerate(
        "A B C D E F N7 N8 P1b P1v P2 P3 P4 P5 P6 P7 P8 V1 V2 T1 T2 T3 T4 G H I J K L".split())}
    # Kermany: 8 normal + 10 pneumonia in train, 2 in val, 4 in test.
    for i, name in enumerate("A B C D E F N7 N8".split(), start=1):
        save(img[name], k / "train/NORMAL" / f"IM-{i:04d}-0001.jpeg", quality=95)
    for fname, name in [("person1_bacteria_1", "P1b"), ("person1_virus_2", "P1v"), ("person2_bacteria_3", "P2"),
                        ("person3_bacteria_4", "P3"), ("person4_virus_5", "P4"), ("person5_bacteria_6", "P5"),
                        ("person6_virus_7", "P6"), ("person7_virus_8", "P7"), ("person8_bacteria_9", "P8")]:
        save(img[name], k / "train/PNEUMONIA" / f"{fname}.jpeg", quality=95)
    # exact duplicate inside Kermany train (same bytes, another file name)
    (k / "train/PNEUMONIA/person8_bacteria_10.jpeg").write_bytes((k / "train/PNEUMONIA/person8_bacteria_9.jpeg").read_bytes())
    save(img["V1"], k / "val/NORMAL/IM-0100-0001.jpeg", quality=95)
    save(img["V2"], k / "val/PNEUMONIA/person50_bacteria_11.jpeg", quality=95)
    save(img["T1"], k / "test/NORMAL/IM-0200-0001.jpeg", quality=95)
    save(img["T2"], k / "test/PNEUMONIA/person60_bacteria_12.jpeg", quality=95)
    save(img["T3"], k / "test/PNEUMONIA/person61_virus_13.jpeg", quality=95)
    save(img["T4"], k / "test/PNEUMONIA/person5_bacteria_14.jpeg", quality=95)  # person5 also in train

    o = root / "other" / "Container"
    save(img["A"].resize((150, 120)), o / "Normal/a_small.jpeg", quality=90)             # resized copy
    (o / "Normal/b_q60.jpeg").write_bytes(jpeg_bytes(img["B"], quality=60))              # re-encoded copy
    (o / "Normal/c_renamed.jpeg").write_bytes((k / "train/NORMAL/IM-0003-0001.jpeg").read_bytes())  # renamed
    save(img["D"].transpose(Image.Transpose.FLIP_LEFT_RIGHT), o / "Normal/d_flip.jpeg")  # mirrored copy
    save(img["E"].rotate(5, resample=Image.Resampling.BILINEAR), o / "Normal/e_rot.jpeg")  # rotated 5 deg
    save(img["G"].convert("CMYK"), o / "Normal/cmyk.jpg")                                # good, CMYK
    save(img["H"].convert("P"), o / "Normal/palette.png")                                # good, palette
    save(sixteen_bit(img["I"]), o / "Normal/sixteen.png")                                # good, 16-bit
    (o / "Normal/zero.jpeg").write_bytes(b"")                                            # bad: empty
    (o / "Normal/truncated.jpeg").write_bytes(jpeg_bytes(img["J"])[:2000])               # bad: truncated
    (o / "Normal/notimage.png").write_text("this is not an image")                       # bad: not an image
    (o / "Normal/bomb.png").write_bytes(png_bomb_header())                               # bad: bomb
    (o / "Normal/notes.txt").write_text("ignored, and reported as ignored")
    save(img["T2"].resize((200, 180)), o / "BacterialPneumonia/t2_copy.jpeg")            # copy of a test image
    save(img["F"], o / "ViralPneumonia/f_conflict.jpeg")                                 # label conflict
    save(img["K"], o / "COVID-19/covid1.jpeg")
    save(img["L"], o / "COVID-19/covid2.jpeg")
    return root


def class_image(label: int, seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A learnable synthetic "X-ray" for class ``label``: a smooth background (xray_like) with a
    class-specific pattern: 0 none, 1 a bright blob (focal consolidation), 2 fine bright stripes
    (diffuse interstitial pattern). Varied position/intensity so the task is not a single pixel."""
    rng = np.random.default_rng(10_000 + seed)
    base = np.asarray(xray_like(seed, size), dtype=np.float64) * 0.5
    h, w = base.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if label == 1:
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.75) * w
        r = rng.uniform(0.12, 0.2) * min(h, w)
        base += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    elif label == 2:
        period = rng.uniform(4, 6)
        base += 60 * (np.sin(2 * np.pi * (xx + yy * rng.uniform(-0.3, 0.3)) / period) > 0.3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="L")


def make_class_dataset(out_dir: Path, n_train: int = 60, n_val: int = 24, n_test: int = 24,
                       size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """A DatasetDict in dataset_scripts.build's schema (image, label, patient_id, image_sha256,
    source_path), saved with save_to_disk. Two images per patient so grouping matters."""
    import hashlib

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as HFImage, Value

    from modeling.labels import LABELS

    features = Features({"image": HFImage(), "label": ClassLabel(names=list(LABELS)), "patient_id": Value("string"),
                         "image_sha256": Value("string"), "source_path": Value("string")})
    splits = {}
    counter = seed * 100_000
    for name, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        rows = {k: [] for k in features}
        for i in range(n):
            label = (i // 2) % 3  # both images of a patient share its label
            img = class_image(label, counter, size)
            counter += 1
            rows["image"].append(img)
            rows["label"].append(label)
            rows["patient_id"].append(f"{name}-p{i // 2}")
            rows["image_sha256"].append(hashlib.sha256(img.tobytes()).hexdigest())
            rows["source_path"].append(f"{name}/{i}.png")
        splits[name] = Dataset.from_dict(rows, features=features)
    DatasetDict(splits).save_to_disk(str(out_dir))
    return Path(out_dir)


# --- synthetic DICOM -----------------------------------------------------------------------------

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19700101",
           "StudyDate": "20240102", "InstitutionName": "Saint Example Hospital",
           "AccessionNumber": "ACC-987"}


def make_dicom(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    header: bool = True,
    **tags,
) -> bytes:
    """Serialise a minimal CR dataset (with preamble + file meta unless header=False)."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if pixels is not None:
        colour = photometric == "RGB"
        frame_ndim = 3 if colour else 2
        frames = pixels.shape[0] if pixels.ndim > frame_ndim else 1
        rows, cols = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    if header:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(buf, enforce_file_format=True)
        assert buf.getvalue()[128:132] == b"DICM"
    else:
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
        assert buf.getvalue()[128:132] != b"DICM"
    return buf.getvalue()

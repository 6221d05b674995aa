"""Synthetic images and sources for tests: smooth random fields stand in for X-rays (distinct seeds
give unrelated images, ~128 of 256 phash bits apart), and files are planted as needed."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


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

"""Decode each file once and keep what deduplication needs: a content hash of the decoded pixels and
perceptual hashes of the image and of its flipped / slightly rotated variants.

Why these hashes:

- ``pixel_sha256`` hashes the decoded 8-bit grayscale pixels (plus the size), so the same image
  re-saved losslessly, renamed or converted RGB->gray collides exactly, whatever the container.
- ``phash`` is ``imagehash.phash(hash_size=16)`` (256 bits). On the shared sources, re-encoded and
  resized copies land within 14 bits of their original while distinct Kermany images stay >= 38 bits
  apart; the common 64-bit phash puts many *distinct* X-rays within 4-8 bits (all chest films look
  alike at 8x8), so it cannot tell copies from look-alikes.
- 256-bit phash is rotation-sensitive (~20 bits per degree), so the *variants* (mirror image, and
  rotations in 2-degree steps up to +-10 degrees, each also mirrored) are hashed too: a copy rotated by
  up to ~10 degrees is within ~1 degree of one variant. Heavier augmentation (large rotations with
  zoom and shear) is out of reach of any perceptual hash; exclude pre-augmented folders at the source.

Fingerprints are cached in SQLite keyed by the file's SHA-256 (plus :data:`FINGERPRINT_VERSION`), so
a rebuild only decodes files it has not seen, wherever they moved.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagehash
from PIL import Image
from tqdm.auto import tqdm

from modeling.image_io import ImageLoadError, load_image_with_info, pixel_sha256

FINGERPRINT_VERSION = 1
HASH_SIZE = 16
ROTATIONS = (-10, -8, -6, -4, -2, 2, 4, 6, 8, 10)
_WORK_SIZE = 128  # hashes are computed on a 128x128 copy: phash resizes to 64x64 anyway


@dataclass
class Fingerprint:
    file_sha256: str
    ok: bool
    error_reason: str = ""
    error_message: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    converted: list[str] = field(default_factory=list)
    pixel_sha256: str = ""
    phash: str = ""  # hex, the image as it is
    variants: list[str] = field(default_factory=list)  # hex, mirrored / rotated variants

    @property
    def needs_reencode(self) -> bool:
        """True unless the file is a plain 8-bit gray/RGB JPEG or PNG that any decoder reads the way
        our loader does. Others (16-bit, CMYK, palette, alpha, DICOM, TIFF, EXIF-rotated) are
        stored as the loader's 8-bit PNG, so the dataset's ``image`` is what the model sees."""
        plain = self.format in ("JPEG", "PNG") and self.mode in ("L", "RGB")
        return not plain or any("EXIF" in note for note in self.converted)


def _phash(img: Image.Image) -> str:
    return str(imagehash.phash(img, hash_size=HASH_SIZE))


def image_phash(img: Image.Image) -> str:
    """The phash of an 8-bit grayscale image exactly as :func:`perceptual_hashes` computes it, without
    the variants (22x cheaper): what an index of reference images needs, since the variants of the
    *query* image already cover mirrored and rotated copies."""
    return _phash(img.resize((_WORK_SIZE, _WORK_SIZE), Image.Resampling.BILINEAR))


def perceptual_hashes(img: Image.Image) -> tuple[str, list[str]]:
    """(phash of the image, phashes of its variants) for an 8-bit grayscale image."""
    small = img.resize((_WORK_SIZE, _WORK_SIZE), Image.Resampling.BILINEAR)
    mirrored = small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    variants = [_phash(mirrored)]
    for base in (small, mirrored):
        for angle in ROTATIONS:
            variants.append(_phash(base.rotate(angle, resample=Image.Resampling.BILINEAR)))
    return _phash(small), variants


def fingerprint_bytes(data: bytes, file_sha256: str | None = None, name: str | None = None) -> Fingerprint:
    sha = file_sha256 or hashlib.sha256(data).hexdigest()
    try:
        img, info = load_image_with_info(data, name=name)
    except ImageLoadError as e:
        return Fingerprint(file_sha256=sha, ok=False, error_reason=e.reason, error_message=e.detail)
    return fingerprint_image(img, info, sha)


def fingerprint_image(img, info, file_sha256: str = "") -> Fingerprint:
    """The fingerprint of an image already decoded by the loader (no second decode)."""
    ph, variants = perceptual_hashes(img)
    return Fingerprint(
        file_sha256=file_sha256, ok=True, format=info.format, mode=info.mode, width=info.width,
        height=info.height, converted=list(info.notes) if info.converted else [], pixel_sha256=pixel_sha256(img),
        phash=ph, variants=variants,
    )


def fingerprint_file(path: str | os.PathLike) -> Fingerprint:
    return fingerprint_bytes(Path(path).read_bytes(), name=str(path))


class FingerprintCache:
    """SQLite store ``file_sha256 -> Fingerprint`` (JSON). One writer (the build's main process)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS fp (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    @staticmethod
    def _key(file_sha256: str) -> str:
        return f"v{FINGERPRINT_VERSION}:{file_sha256}"

    def get_many(self, shas: list[str]) -> dict[str, Fingerprint]:
        out = {}
        for i in range(0, len(shas), 500):
            chunk = [self._key(s) for s in shas[i:i + 500]]
            q = f"SELECT key, value FROM fp WHERE key IN ({','.join('?' * len(chunk))})"
            for key, value in self._db.execute(q, chunk):
                out[key.split(":", 1)[1]] = Fingerprint(**json.loads(value))
        return out

    def put_many(self, fps: list[Fingerprint]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO fp VALUES (?, ?)",
                                 [(self._key(f.file_sha256), json.dumps(asdict(f))) for f in fps])

    def close(self) -> None:
        self._db.close()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _work(path: str) -> Fingerprint:
    return fingerprint_file(path)


def _init_worker() -> None:
    # Two processes on two cores: one BLAS/OpenMP thread each, or they fight (up to 8x slower).
    os.environ["OMP_NUM_THREADS"] = "1"


def fingerprint_paths(paths: list[Path], cache: FingerprintCache | None, workers: int = 2,
                      progress: bool = True) -> tuple[dict[Path, Fingerprint], dict[str, int]]:
    """Fingerprints for every path (unreadable files give ``ok=False``, never an exception).
    Returns ``(fingerprints, stats)`` with stats ``{"from_cache": n, "computed": m}``."""
    shas, io_errors = {}, {}
    for p in tqdm(paths, desc="reading files", disable=not progress, unit="file"):
        try:
            shas[p] = _file_sha256(p)
        except OSError as e:  # permissions, vanished file...: report it, keep building
            io_errors[p] = Fingerprint(file_sha256="", ok=False, error_reason="io_error",
                                       error_message=f"cannot read file: {e.strerror or e}")
    cached = cache.get_many(sorted(set(shas.values()))) if cache else {}
    todo = sorted({p for p, s in shas.items() if s not in cached}, key=str)
    # identical files need decoding once
    todo_unique = list({shas[p]: p for p in todo}.values())
    computed: dict[str, Fingerprint] = {}
    if todo_unique:
        bar = tqdm(total=len(todo_unique), desc="hashing images", disable=not progress, unit="img")
        if workers > 1 and len(todo_unique) > 50:
            with ProcessPoolExecutor(workers, initializer=_init_worker) as ex:
                for p, fp in zip(todo_unique, ex.map(_work, [str(p) for p in todo_unique], chunksize=32)):
                    computed[shas[p]] = fp
                    bar.update()
        else:
            for p in todo_unique:
                computed[shas[p]] = fingerprint_file(p)
                bar.update()
        bar.close()
        if cache:
            cache.put_many(list(computed.values()))
    by_sha = {**cached, **computed}
    out = {p: by_sha[s] for p, s in shas.items()}
    out.update(io_errors)
    return out, {"from_cache": len(shas) - len(todo), "computed": len(todo_unique)}


def encode_png(data: bytes) -> bytes:
    """The loader's 8-bit grayscale image as PNG bytes (for files that need re-encoding)."""
    img, _ = load_image_with_info(data)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

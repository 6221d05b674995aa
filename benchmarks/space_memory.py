"""Memory and time per request of the Space's analysis path, for the largest inputs it accepts.

    python benchmarks/space_memory.py [--model space/model] [--threads 2]

Each case runs in a fresh process (so the peak resident memory is that case's): the service is built
on the model and warmed up, its resident memory read, then one file is analysed as the Space does it
(decode with the working-size limit, input gate, prediction + Grad-CAM, staging of the pixels); the
process's peak resident memory (``ru_maxrss``) minus the warmed-up baseline is the request's cost.
Writes ``benchmarks/results/space_memory.json``. The issue's bound: any accepted file < 1 GB and < 3 s
on 2 cores. Measured, not asserted: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from modeling.cli import add_flag, parse
from modeling.paths import shown_path

ROOT = Path(__file__).resolve().parents[1]


def film(size: tuple[int, int]) -> Image.Image:
    """A smooth film-like 8-bit image of ``size`` (cheap to make at any size)."""
    example = next((ROOT / "space" / "examples").glob("kermany_test_normal_*.jpeg"))  # the Space's normal example
    small = np.asarray(Image.open(example).convert("L"))
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def cases(folder: Path) -> dict[str, Path]:
    out = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        p = folder / name
        img.save(p, **kw)
        out[name] = p

    save("typical_1024.jpg", film((1024, 1024)), quality=90)
    save("detector_4300x4300_16bit.png", Image.fromarray((np.asarray(film((4300, 4300)), np.uint16) * 257)))
    big = Image.new("L", (7000, 7000), 0)  # the case: a tiny file that decodes to 49 MP
    big.paste(film((1000, 1000)), (3000, 3000))
    save("bomb_like_7000x7000.png", big, optimize=True)
    save("photo_like_7000x7000.jpg", film((7000, 7000)), quality=85)
    p = folder / "cr_3000x3000_12bit.dcm"
    p.write_bytes(dicom_bytes(np.asarray(film((3000, 3000)), np.uint16) * 16))
    out[p.name] = p
    z = folder / "batch_50x2000.zip"
    one = io.BytesIO()
    film((2000, 2000)).save(one, format="JPEG", quality=90)
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(50):
            zf.writestr(f"{i:02d}.jpg", one.getvalue())
    out[z.name] = z
    return out


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """An uncompressed 12-bit CR chest DICOM of ``pixels`` (pydicom, no patient data)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(model: str, path: str, threads: int) -> dict:
    """In this (fresh) process: build, warm up, measure one request."""
    import torch

    torch.set_num_threads(threads)
    from modeling.predict import Predictor
    from space.service import CxrService, InputError
    from space.store import FeedbackStore

    data_dir = tempfile.mkdtemp(prefix="cxr-bench-")
    service = CxrService(Predictor.from_pretrained(model, precision="auto"), FeedbackStore(data_dir))
    service.warmup()
    base = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if path.endswith(".zip"):
        rows = service.batch([path])
        result = {"rows": len(rows), "errors": sum(bool(r["error"]) for r in rows)}
    else:
        try:
            a = service.analyze(Path(path).read_bytes(), heatmap=True)
            result = {"image_size": list(a.prediction.image_size), "notes": a.notes}
        except InputError as exc:  # refused: what it cost to decide that is measured all the same
            result = {"refused": str(exc)}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 3), "baseline_rss_mb": round(base, 1),
            "peak_above_baseline_mb": round(max(0.0, peak - max(base, peak_before)), 1),
            "peak_rss_mb": round(peak, 1), **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--threads", type=int, default=2)
    add_flag(ap, "--output", old=("--out",), default=str(ROOT / "benchmarks" / "results" / "space_memory.json"))
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case here
    args = parse(ap, argv)
    if args.case:
        print(json.dumps(run_case(args.model, args.case, args.threads)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in cases(Path(tmp)).items():
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                                   "--case", str(path)], capture_output=True, text=True, env=env)
            if proc.returncode:
                results[name] = {"error": proc.stderr.strip().splitlines()[-1]}
            else:
                results[name] = {"file_mb": round(path.stat().st_size / 2**20, 2),
                                 **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(name, results[name], flush=True)
    out = {"model": shown_path(args.model), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "bound": "< 1024 MB above baseline and < 3 s per accepted file",
           "results": results}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

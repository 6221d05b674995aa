"""Archive prediction speed and memory (a measurement, not a test): films/s on a generated archive
of mixed JPEG / PNG / 12-bit DICOM films at realistic sizes with a few broken files, for the per-file
loop of `cxr-predict FILE...` (decode, then predict, one film at a time) against `cxr-predict DIR
--output` (modeling.archive) with 0, 1 or 2 decoding workers and batch 1 or 16, and the peak memory of
each run's whole process tree (proportional set size, so pages a forked worker shares with its parent
count once; sampled every 50 ms). Each configuration runs in its own process, timed from after the
model is loaded; the best one is run again on an archive twice the size to show that memory does not
grow with it.

    python benchmarks/archive.py [--films 48] [--model space/model]

Writes ``benchmarks/results/archive.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BROKEN = 3


FULLRES = ROOT.parent / "shared" / "data" / "kermany-fullres-sample"


def film(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A real pediatric film at full size (../shared's full-resolution Kermany sample, resized, with fine
    noise so that copies differ), so that the rows are predicted like an archive's; without ../shared a
    smooth synthetic image (which the input gate then refuses: the timing is still the same work)."""
    rng = np.random.default_rng(seed)
    sources = sorted(p for p in FULLRES.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")
                     and "test" not in p.parts)  # never the official test films, even for a timing
    if sources:
        with Image.open(sources[seed % len(sources)]) as im:
            base = im.convert("L").resize(size, Image.Resampling.BICUBIC)
        a = np.asarray(base, dtype=np.float32) + rng.normal(0, 2, size[::-1])
    else:
        small = Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        a = np.asarray(small, dtype=np.float32) * 0.8 + 25 + rng.normal(0, 4, size[::-1])
    return np.clip(a, 0, 255)


def make_archive(root: Path, n: int) -> dict:
    """n films in nested folders, a third each: DICOM 12-bit 2800x2800, RLE-lossless compressed (no
    extension; archives store compressed DICOM, whose decoding is the cost), JPEG 2000x2400, PNG 8-bit
    1600x1900; plus BROKEN broken files (truncated JPEG, empty PNG, random bytes .dcm)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

    counts = {"dicom": 0, "jpeg": 0, "png": 0, "broken": BROKEN}
    for i in range(n):
        folder = root / f"patient-{i // 6:03d}" / f"study-{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = ("dicom", "jpeg", "png")[i % 3]
        counts[kind] += 1
        if kind == "dicom":
            px = (film(i, (2800, 2800)) * 16).astype(np.uint16)
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
            ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
            ds.Rows, ds.Columns = px.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = px.tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(RLELossless)
            pydicom.dcmwrite(folder / f"IM{i:05d}", ds, enforce_file_format=True)
        elif kind == "jpeg":
            Image.fromarray(film(i, (2000, 2400)).astype(np.uint8)).save(folder / f"film{i:05d}.jpg", quality=90)
        else:
            Image.fromarray(film(i, (1600, 1900)).astype(np.uint8)).save(folder / f"film{i:05d}.png")
    bad = root / "broken"
    bad.mkdir()
    (bad / "cut.jpg").write_bytes((root / "patient-000" / "study-1" / "film00001.jpg").read_bytes()[:5000])
    (bad / "empty.png").write_bytes(b"")
    (bad / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    return counts


CHILD = r"""
import json, os, sys, threading, time
import psutil, torch
torch.set_num_threads(2)
from pathlib import Path
from modeling.predict import Predictor
cfg = json.loads(sys.argv[1])
predictor = Predictor.from_pretrained(cfg["model"], precision=cfg.get("precision", "auto"))
me = psutil.Process()
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        try:
            rss = me.memory_full_info().pss + sum(c.memory_full_info().pss for c in me.children(recursive=True))
        except psutil.Error:
            continue
        peak[0] = max(peak[0], rss)
        time.sleep(0.05)
compile_seconds = None
if cfg.get("compile"):  # cxr-predict --compile: compiled once before the timed run (a one-off start-up cost)
    # with the thread count the run's forward pass will use (the cores the workers leave free), as the CLI
    # compiles: a graph compiled under another count is compiled again inside the run
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg["workers"]))
    info = predictor.compile()
    assert info["compiled"], info
    compile_seconds = info["seconds"]
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if cfg["mode"] == "parts":  # the work one film needs, part by part, for the bound this machine sets
    stop.set()  # no memory sampling here: reading /proc every 50 ms takes CPU from what is timed
    from modeling.archive import find_films
    from modeling.image_io import ImageLoadError, load_image
    films, decode = [], 0.0
    for src in find_films([cfg["root"]]):
        t = time.perf_counter()
        try:
            films.append(load_image(src.path, max_side=2048))
        except (ImageLoadError, OSError):
            continue  # a broken file costs a row, not a decode: only readable films are timed
        decode += time.perf_counter() - t
    def predict_s(threads):
        # the best setting's forward pass: compiled, one film at a time, compiled at this thread count
        torch.set_num_threads(threads)
        p = Predictor(predictor.model, predictor.processor, precision=predictor.precision,
                      gate=predictor.gate, scope=predictor.scope)
        assert p.compile(films[0])["compiled"]
        p.predict_one(films[0])
        t = time.perf_counter()
        for im in films:
            p.predict_one(im)
        return time.perf_counter() - t
    print(json.dumps({"films": len(films), "decode_s": decode, "predict_s_2_threads": predict_s(2),
                      "predict_s_1_thread": predict_s(1)}))
    sys.exit(0)
if cfg["mode"] == "loop":
    from modeling.archive import find_films
    from modeling.image_io import ImageLoadError, load_image
    rows = failed = 0
    for src in find_films([cfg["root"]]):
        try:
            predictor.predict_one(load_image(src.path, max_side=cfg.get("max_side", 2048)))
        except (ImageLoadError, OSError):
            failed += 1
        rows += 1
else:
    from modeling.archive import ArchiveConfig, predict_archive, read_rows
    out = Path(cfg["out"])
    s = predict_archive(ArchiveConfig(inputs=[cfg["root"]], output=str(out), workers=cfg["workers"],
                                      batch_size=cfg["batch_size"], progress=False), predictor)
    rows, failed = s.written, s.failed
wall = time.perf_counter() - t0
stop.set()
print(json.dumps({"rows": rows, "failed": failed, "seconds": wall, "peak_pss_mb": peak[0] / 2**20,
                  **({"compile_seconds": compile_seconds} if compile_seconds else {})}))
"""


# The per-file loop as the issue found it: `cxr-predict FILE...` at the commit before archive mode (7c43f24^),
# its own code and bundled model, float32, films decoded at full size, RLE DICOM by pydicom's own decoder
# (pylibjpeg-rle came later), run in a child whose import path is that commit's tree.
ISSUE_COMMIT = "7c43f24^"
OLD_LOOP = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
from pydicom.pixels.decoders import RLELosslessDecoder
if "pylibjpeg" in RLELosslessDecoder.available_plugins:
    RLELosslessDecoder.remove_plugin("pylibjpeg")
from modeling.image_io import ImageLoadError, load_image
from modeling.predict import Predictor
cfg = json.loads(sys.argv[1])
predictor = Predictor.from_pretrained(cfg["model"], precision="float32")
t0 = time.perf_counter()
failed = 0
for name in cfg["files"]:
    try:
        print(json.dumps({"file": name, **predictor.predict_one(load_image(name)).to_dict()}), file=sys.stderr)
    except (ImageLoadError, OSError):
        failed += 1
print(json.dumps({"rows": len(cfg["files"]), "failed": failed, "seconds": time.perf_counter() - t0, "peak_pss_mb": 0.0}))
"""


def old_tree(dest: Path) -> Path | None:
    """The repository at ISSUE_COMMIT (modeling/ and space/model/), extracted with git archive; None when
    git or the commit is not there (a copy without history)."""
    dest.mkdir(parents=True)
    try:
        tar = subprocess.run(["git", "archive", ISSUE_COMMIT, "modeling", "space/model"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return dest


def run(cfg: dict, code: str = CHILD, tree: Path = ROOT) -> dict:
    """One measurement in a child process: ``code`` (this tree's CHILD, or OLD_LOOP) importing the
    project from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if "rows" in got:  # a timed run (the "parts" measurement has its own fields)
        got["films_per_s"] = got["rows"] / got["seconds"]
    return got


def bound(parts: dict, loop: dict) -> dict:
    """The most the best setting's kind of schedule can gain over the loop on this machine. Each readable
    film needs its decode (one core: Pillow and pydicom decode on one thread), then the image processor
    and a forward pass; their least work here is the compiled one-film, one-thread ``predict_one`` (more
    threads split the forward, with overhead). C cores finish at most C / (decode + that) films per
    second with this forward pass. Compared with the loop's readable films per second (its rows include
    the broken files, which cost no decode): the same units."""
    n = parts["films"]
    loop_readable_per_s = (loop["rows"] - loop["failed"]) / loop["seconds"]
    d, p1, p2 = (parts["decode_s"] / n, parts["predict_s_1_thread"] / n, parts["predict_s_2_threads"] / n)
    cores = os.cpu_count() or 1
    most = cores / (d + p1)
    return {"decode_ms_per_film": round(1000 * d, 1), "predict_ms_per_film_1_thread": round(1000 * p1, 1),
            "predict_ms_per_film_2_threads": round(1000 * p2, 1), "cores": cores,
            "most_films_per_s": round(most, 2), "loop_readable_films_per_s": round(loop_readable_per_s, 2),
            "most_speedup_vs_loop": round(most / loop_readable_per_s, 2),
            "rule": "cores / (decode + compiled one-thread predict_one) per readable film, against the loop's "
                    "readable films per second"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--films", type=int, default=48)
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "archive.json"))
    args = ap.parse_args()
    # two per-file loops: today's command as it runs (`cxr-predict FILE...`: float32, films decoded at full
    # size), and the same loop with the archive mode's settings (bf16 where native, decoded at most 2048
    # px): the stricter reference, whose difference from the archive mode is the schedule alone
    configs = [("per-file loop, the archive's settings (bf16, decode at most 2048 px)", {"mode": "loop"}),
               ("today's cxr-predict FILE... (float32, full-size decode)",
                {"mode": "loop", "precision": "float32", "max_side": None}),
               ("archive, 0 workers, batch 1", {"mode": "archive", "workers": 0, "batch_size": 1}),
               ("archive, 0 workers, batch 16", {"mode": "archive", "workers": 0, "batch_size": 16}),
               ("archive, 1 worker, batch 16", {"mode": "archive", "workers": 1, "batch_size": 16}),
               ("archive, 2 workers, batch 1", {"mode": "archive", "workers": 2, "batch_size": 1}),
               ("archive, 2 workers, batch 16", {"mode": "archive", "workers": 2, "batch_size": 16}),
               ("archive, 2 workers, batch 1, --compile", {"mode": "archive", "workers": 2, "batch_size": 1,
                                                          "compile": True})]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        t0 = time.perf_counter()
        counts = make_archive(root, args.films)
        print(f"archive of {args.films} films + {BROKEN} broken made in {time.perf_counter() - t0:.0f} s", flush=True)
        results = []
        for name, cfg in configs:
            got = run({**cfg, "model": args.model, "root": str(root), "out": str(Path(tmp) / "r.parquet")})
            results.append({"config": name, **cfg, **{k: round(v, 3) if isinstance(v, float) else v for k, v in got.items()}})
            print(json.dumps(results[-1]), flush=True)
            (Path(tmp) / "r.parquet").unlink(missing_ok=True)
        loop, todays = results[0]["films_per_s"], results[1]["films_per_s"]
        best = max(results[2:], key=lambda r: r["films_per_s"])
        tree = old_tree(Path(tmp) / "at-issue")
        at_issue = None
        if tree is not None:
            sys.path.insert(0, str(ROOT))
            from modeling.archive import find_films

            files = [str(src.path) for src in find_films([root])]
            got = run({"model": str(tree / "space" / "model"), "files": files}, OLD_LOOP, tree)
            at_issue = {"config": f"cxr-predict FILE... as the issue found it ({ISSUE_COMMIT}: its code and model, "
                                  "float32, full-size decode, pydicom's own RLE decoder)", "commit": ISSUE_COMMIT,
                        **{k: round(v, 3) if isinstance(v, float) else v for k, v in got.items() if k != "peak_pss_mb"}}
            print(json.dumps(at_issue), flush=True)
        parts = run({"mode": "parts", "model": args.model, "root": str(root)})
        big = Path(tmp) / "archive2x"
        make_archive(big, 2 * args.films)
        cfg = {k: best[k] for k in ("mode", "workers", "batch_size", "compile") if k in best}
        twice = run({**cfg, "model": args.model, "root": str(big), "out": str(Path(tmp) / "r2.parquet")})
    out = {
        "films": args.films, "broken": BROKEN, "archive": counts,
        "sizes": "DICOM 12-bit 2800x2800 RLE lossless (no extension), JPEG q90 2000x2400, PNG 8-bit 1600x1900",
        "films_from": "../shared's full-resolution Kermany sample (real pediatric films, resized)" if FULLRES.is_dir()
                      else "synthetic (no ../shared)",
        "precision": "auto (bfloat16 where native)", "torch_threads_main": 2, "decode_max_side": 2048,
        "results": results,
        "best": {"config": best["config"], "speedup_vs_loop": round(best["films_per_s"] / loop, 2),
                 "speedup_vs_todays_command": round(best["films_per_s"] / todays, 2),
                 **({"speedup_vs_the_loop_the_issue_found": round(best["films_per_s"] / at_issue["films_per_s"], 2)}
                    if at_issue else {})},
        "loop_the_issue_found": at_issue,
        "bound": bound(parts, results[0]),
        "twice_the_archive": {"config": best["config"], "films": 2 * args.films + BROKEN,
                              "peak_pss_mb": round(twice["peak_pss_mb"], 1), "films_per_s": round(twice["rows"] / twice["seconds"], 3),
                              "peak_pss_mb_at_1x": best["peak_pss_mb"]},
        "target": ">= 2x the per-file loop; memory bounded (no growth with the archive's size); a broken file costs one row",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["best"]), json.dumps(out["twice_the_archive"]), json.dumps(out["bound"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

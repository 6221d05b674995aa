"""What the Space's input gate (rules + the learned gate of the released model) does to real films and
to things that are not frontal chest films.

    python benchmarks/input_gate.py [--model space/model] [--dataset data/cxr-pneumonia]

Every image goes through the Space's own path (:meth:`space.service.CxrService.analyze`: the loader,
the rules of ``modeling.quality``, the prediction with the learned gate, turning a film upright) and
is counted as accepted (and how many of those with the gate's caution note: an unusual film),
corrected (turned upright / grey levels restored, then predicted) or refused.

- false refusals: every validation film and every official test film, upright (the test films are
  only *counted* here, after the gate's limit was fixed on validation; nothing is chosen on them);
  external chest films: Skytells' adult COVID-19 films (another source, other devices);
- catch rates: the validation films turned by 90/180/270 degrees and with inverted grey levels;
  photographs (a portrait, two colour photos in grey), a head MRI slice, a terrain map and a company
  logo shipped with matplotlib and scikit-learn, synthetic grey screenshots with text, noise and
  gradients, and the non-chest DICOM of ``../shared/data/dicom``.

Writes ``benchmarks/results/input_gate.json`` (the README's gate figures come from it).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from modeling.cli import add_flag, parse
from modeling.paths import shown_path
from modeling.data import load_cxr_dataset
from modeling.gate import invert, turn
from modeling.image_io import to_grayscale
from modeling.predict import Predictor
from space.service import CxrService, InputError
from space.store import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def screenshot(seed: int) -> Image.Image:
    """A grey application window with a title bar and lines of text (a name among them)."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(700, 1300)), int(rng.integers(600, 1000))
    img = Image.new("L", (w, h), int(rng.integers(180, 240)))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w, 40), fill=int(rng.integers(40, 90)))
    font = ImageFont.load_default(size=int(rng.integers(14, 28)))
    d.text((12, 8), "PACS Viewer - Doe, Jane  DOB 1970-01-01", fill=250, font=font)
    y = 60
    while y < h - 30:
        d.text((20, y), " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(3, 9)))
                                for _ in range(rng.integers(4, 12))), fill=int(rng.integers(0, 60)), font=font)
        y += int(rng.integers(24, 44))
    return img


def negatives() -> dict[str, list[bytes]]:
    """Things that are not frontal chest films, by kind (as file bytes)."""
    import matplotlib
    import sklearn.datasets

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    sk = Path(sklearn.datasets.__file__).parent / "images"
    out: dict[str, list[bytes]] = {"photographs": [], "other_images": [], "screenshots": [], "synthetic": [],
                                   "non_chest_dicom": []}
    for p in (sample / "grace_hopper.jpg", sk / "china.jpg", sk / "flower.jpg"):  # grey copies: past the colour rule
        with Image.open(p) as im:
            out["photographs"].append(png(ImageOps.grayscale(im)))
            out["photographs"].append(png(ImageOps.grayscale(im).resize((512, 512))))
    mri = np.frombuffer(gzip.open(sample / "s1045.ima.gz").read(), np.uint16).reshape(256, 256)
    out["other_images"].append(png(Image.fromarray((mri / max(1, mri.max()) * 255).astype(np.uint8))))
    dem = np.load(sample / "jacksboro_fault_dem.npz")["elevation"].astype(np.float64)
    out["other_images"].append(png(Image.fromarray(((dem - dem.min()) / np.ptp(dem) * 255).astype(np.uint8))))
    for p in (sample / "Minduka_Present_Blue_Pack.png", sample / "logo2.png"):
        with Image.open(p) as im:
            out["other_images"].append(png(ImageOps.grayscale(im.convert("RGB"))))
    out["screenshots"] = [png(screenshot(s)) for s in range(12)]
    rng = np.random.default_rng(0)
    for s in range(6):
        out["synthetic"].append(png(Image.fromarray(rng.integers(0, 256, (400, 400), dtype=np.uint8))))
        g = np.add.outer(np.linspace(0, 255, 400), np.linspace(0, 60 * s, 400)) % 256
        out["synthetic"].append(png(Image.fromarray(g.astype(np.uint8))))
    for p in sorted((SHARED / "data" / "dicom").glob("*not_chest*.dcm")):
        out["non_chest_dicom"].append(p.read_bytes())
    return out


def outcome(service: CxrService, data: bytes) -> str:
    try:
        a = service.analyze(data, channel="batch", heatmap=False)
    except InputError:
        return "refused"
    if any("turned" in n or "inverted back" in n for n in a.notes):
        return "corrected"
    return "cautioned" if any("unusual for this model" in n for n in a.notes) else "accepted"


def count(service: CxrService, items) -> dict:
    """Outcomes: accepted (``cautioned``: accepted with the gate's caution note, also counted as accepted),
    corrected (turned upright / inverted back, then predicted) or refused."""
    res = [outcome(service, d) for d in items]
    return {"n": len(res), "accepted": res.count("accepted") + res.count("cautioned"),
            "cautioned": res.count("cautioned"), "corrected": res.count("corrected"), "refused": res.count("refused")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flag(ap, "--model", default=str(ROOT / "space" / "model"))
    add_flag(ap, "--dataset", default=str(ROOT / "data" / "cxr-pneumonia"))
    add_flag(ap, "--output", default=str(ROOT / "benchmarks" / "results" / "input_gate.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = parse(ap, argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    predictor = Predictor.from_pretrained(args.model, precision="auto")
    if predictor.gate is None:
        raise SystemExit(f"{args.model} has no input gate (fit it with cxr-gate)")
    ds = load_cxr_dataset(args.dataset)
    results: dict = {"model": shown_path(args.model), "model_revision": predictor.revision, "gate": predictor.gate.meta,
                     "distance_limit": predictor.gate.distance_limit, "caution_limit": predictor.gate.caution_limit}
    with tempfile.TemporaryDirectory() as tmp:
        service = CxrService(predictor, FeedbackStore(Path(tmp) / "store"))
        val = [to_grayscale(r["image"]) for r in ds["validation"]]
        results["validation_upright"] = count(service, (png(f) for f in val))
        results["test_upright"] = count(service, (png(to_grayscale(r["image"])) for r in ds["test"]))
        for r in (90, 180, 270):
            results[f"validation_turned_{r}"] = count(service, (png(turn(f, r)) for f in val))
        results["validation_inverted"] = count(service, (png(invert(f)) for f in val))
        covid = sorted((SHARED / "data" / "skytells-covid19-xray" / "NonAugmentedTrain" / "COVID-19").glob("*"))
        if covid:
            results["external_chest_covid19_adult"] = count(service, (p.read_bytes() for p in covid))
        for kind, items in negatives().items():
            if items:
                results[f"negatives_{kind}"] = count(service, items)
    for k, v in results.items():
        if isinstance(v, dict) and "n" in v:
            v["refused_rate"] = round(v["refused"] / v["n"], 4) if v["n"] else None
            v["caught_rate"] = round((v["refused"] + v["corrected"]) / v["n"], 4) if v["n"] else None
            print(f"{k:32s} {v}")
    results["seconds"] = round(time.time() - t0, 1)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

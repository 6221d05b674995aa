"""The private page in Chromium (a measurement, not a test): cold load and per-film time of each shipped
ONNX variant, on this machine, against the Space served locally.

Cold load: a fresh browser (empty cache) opens ``/private/?variant=V`` and the clock stops when the
page says the model is ready, i.e. page + ONNX Runtime Web + model download + inference session
(``window.cxrPrivate.loadMs``, measured by the page from its first script; the navigation time before
it is added from the Navigation Timing API). Per film: the Space's three pediatric examples, each
chosen ``--repeats`` times; the page reports film -> probabilities (decode, checks, preprocessing,
forward) and film -> heatmap (the same plus the overlay drawn).

    python benchmarks/private_page.py [--model space/model] [--repeats 5]

Writes ``benchmarks/results/private_page.json``. Needs ``bash scripts/dev.sh setup`` (npm packages,
the ONNX export) and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold-loads", type=int, default=3)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "private_page.json"))
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
    from playwright.sync_api import sync_playwright
    from space_screenshot import CHROMIUM_ARGS
    from test_space import start_app

    cfg = json.loads((Path(args.model) / "onnx" / "browser.json").read_text())
    examples = sorted((ROOT / "space" / "examples").glob("kermany_*.jpeg"))
    app = start_app(Path(args.model), Path(tempfile.mkdtemp()), {"OMP_NUM_THREADS": "2"})
    results = {}
    try:
        with sync_playwright() as p:
            for variant, info in cfg["variants"].items():
                if not info["shipped"]:
                    continue
                loads, films, heats, threads = [], [], [], None
                for i in range(args.cold_loads):
                    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    try:
                        page = browser.new_page()
                        page.goto(f"{app.url}private/?variant={variant}")
                        page.wait_for_function("() => window.cxrPrivate && window.cxrPrivate.ready", timeout=300_000)
                        state = page.evaluate("() => window.cxrPrivate")
                        before = page.evaluate("() => performance.getEntriesByType('navigation')[0].domInteractive")
                        loads.append(state["loadMs"] + before)
                        threads = state["threads"]
                        if i == 0:
                            run = 0
                            for _ in range(args.repeats):
                                for film in examples:
                                    run += 1
                                    page.locator("input[type=file]").set_input_files(str(film))
                                    page.wait_for_function(
                                        f"() => document.querySelector('[data-testid=private-result]').dataset.run === '{run}'",
                                        timeout=120_000)
                            runs = page.evaluate("() => window.cxrPrivate.runs")
                            films = [r["probabilitiesMs"] for r in runs[len(examples):]]  # first pass is warm-up
                            heats = [r["heatmapMs"] for r in runs[len(examples):]]
                    finally:
                        browser.close()
                results[variant] = {
                    "file": info["file"], "megabytes": round(info["bytes"] / 2**20, 1), "wasm_threads": threads,
                    "cold_load_ms": {"median": round(statistics.median(loads)), "all": [round(x) for x in loads]},
                    "film_to_probabilities_ms": {"median": round(statistics.median(films)), "n": len(films)},
                    "film_to_heatmap_ms": {"median": round(statistics.median(heats)), "n": len(heats)},
                }
                print(variant, json.dumps(results[variant]), flush=True)
    finally:
        app.proc.terminate()
        app.proc.wait(timeout=60)
    out = {"browser": "Debian chromium (headless), ONNX Runtime Web WASM backend", "server": "the Space, local",
           "examples": [f.name for f in examples], "repeats": args.repeats, "cold_loads": args.cold_loads,
           "targets": {"cold_load_ms_smaller_variant": 3000, "film_to_probabilities_ms": 400, "film_to_heatmap_ms": 800},
           "variants": results, "cpu": platform.processor() or platform.machine()}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

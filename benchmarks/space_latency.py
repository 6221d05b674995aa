"""Where the time of one Space request goes, stage by stage, next to the Predictor's own time.

    python benchmarks/space_latency.py [--model space/model] [--repeats 20] [--threads 2]

Two measurements on the same machine, in the same run:

* **stages**, in process, on the Space's normal example: decode (the project's loader), the rules
  (``modeling.quality``), the plain pass (bf16: prediction, input gate, scope check), Grad-CAM in bf16
  (the Space's one pass since issue 21: it gives the prediction, the checks and the map) and, for
  comparison, in float32 (the Space's second pass before), hashing the pixels, staging the PNG (after the
  answer), the store's write, and the overlay the answer carries; beside them, ``CxrService.analyze``
  whole and the Predictor's own predict + Grad-CAM (``predict_one(heatmap=True)``, in the Space's
  precision: the reference the target is set against; float32 too);
* **round trip**: ``gradio_client`` against the Space started here (``space.app``, the same model), the
  client's wall time per ``/predict`` call and the ``latency_ms`` the Space reports; and the same call
  refused before any model work (an unknown heatmap class: upload, queue, the file read, decoded and
  checked, the error answered): Gradio's transport plus a decode, whatever the model does; the
  client's time from the call to its queue join returning (its upload and join), and what building
  one ``httpx.Client`` costs (gradio_client builds one for the upload, the queue join and the answer's
  event stream of every call: three SSL contexts, each loading the CA bundle);
* the same round trip with a client given one SSL context built once (``Client(url,
  ssl_verify=ssl.create_default_context(cafile=certifi.where()))``: the same certificate checks as the
  default, which builds that context anew for every request), as docs/space.md advises API users.

Medians of ``--repeats`` calls after warm-up. Writes ``benchmarks/results/space_latency.json``; the
README's latency line comes from it. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "space" / "examples" / "kermany_test_normal_IM-0003-0001.jpeg"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def stages(model: str, repeats: int) -> dict:
    from modeling.image_io import load_image_with_info, pixel_sha256
    from modeling.model_thread import ModelThread
    from modeling.predict import Predictor
    from modeling.quality import symmetry_problems, xray_problems
    from space.app import overlay_png
    from space.service import CxrService
    from space.store import FeedbackStore, PredictionRecord

    data = EXAMPLE.read_bytes()
    # Loaded and run on one thread, the service's model thread, as in the Space (modeling.model_thread:
    # a second thread calling the model would slow every pass measured here)
    model_thread = ModelThread()
    fast = model_thread.call(Predictor.from_pretrained, model, precision="auto")
    ref = model_thread.call(Predictor.from_pretrained, model, precision="float32")
    gray, info = load_image_with_info(data, max_side=2048)
    heat = model_thread.call(ref.predict_one, gray, heatmap=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeedbackStore(Path(tmp) / "store")
        service = CxrService(fast, FeedbackStore(Path(tmp) / "service"), model_thread=model_thread)
        sha = pixel_sha256(gray)
        n = [0]

        def on_model(fn):  # timed on the model thread itself
            return model_thread.call(median_ms, fn, repeats)

        def stage_png():
            n[0] += 1
            store.stage_image(gray, f"{sha}-{n[0]}")  # a new file each time, as for a new film

        rec = PredictionRecord(model_id="m", model_revision="r", image_sha256=sha, width=gray.size[0],
                               height=gray.size[1], probabilities=heat.probabilities,
                               pneumonia_probability=heat.pneumonia_probability, label=heat.label or "",
                               decision="no_pneumonia", threshold=heat.threshold, latency_ms=1.0, channel="api")
        out = {
            "decode": median_ms(lambda: load_image_with_info(data, max_side=2048), repeats),
            "rules": median_ms(lambda: (xray_problems(gray, info, data), symmetry_problems(gray)), repeats),
            "plain_pass_bf16": on_model(lambda: fast.predict_one(gray)),
            "gradcam_bf16_one_pass": on_model(lambda: fast.predict_one(gray, heatmap=True)),
            "gradcam_float32": on_model(lambda: ref.predict_one(gray, heatmap=True)),
            "hash": median_ms(lambda: pixel_sha256(gray), repeats),
            "staging_png": median_ms(stage_png, repeats),
            "store_write": median_ms(lambda: store.record_prediction(rec), repeats),
            "overlay_png_1024": median_ms(lambda: overlay_png(gray, heat.heatmap, 0.4), repeats),
            "service_analyze_whole": median_ms(lambda: service.analyze(data, channel="api"), repeats),
            "predictor_predict_gradcam": on_model(lambda: fast.predict_one(data, heatmap=True)),
            "predictor_predict_gradcam_float32": on_model(lambda: ref.predict_one(data, heatmap=True)),
        }
        out["precision"] = fast.precision
        service.close()  # its model thread too
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(model: str, repeats: int, threads: int, shared_ssl_context: bool = False) -> dict:
    from gradio_client import Client, handle_file

    client_kwargs = {}
    if shared_ssl_context:
        import ssl

        import certifi

        client_kwargs["ssl_verify"] = ssl.create_default_context(cafile=certifi.where())

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MODEL_ID": model, "CXR_DATA_DIR": str(Path(tmp) / "data"), "GRADIO_SERVER_PORT": str(port),
               "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_TEMP_DIR": str(Path(tmp) / "gradio"),
               "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "-m", "space.app"], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.time() + 180
            while True:
                try:
                    client = Client(url, verbose=False, download_files=False, **client_kwargs)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.time() > deadline:
                        raise
                    time.sleep(1)
            # when the client's join of the queue returns (after its upload): what the client spends
            # before the server starts on the call (a tap on gradio_client's own method, nothing changed)
            joined = {}
            send_data = client.send_data

            def timed_send_data(*a, **k):
                out = send_data(*a, **k)
                joined["t"] = time.perf_counter()
                return out

            client.send_data = timed_send_data
            wall, server, refused, to_join = [], [], [], []
            for i in range(repeats + 2):
                t0 = time.perf_counter()
                r = client.predict(handle_file(str(EXAMPLE)), "predicted", api_name="/predict")
                if i >= 2:  # warm-up calls
                    wall.append((time.perf_counter() - t0) * 1000)
                    server.append(r["latency_ms"])
                    to_join.append((joined["t"] - t0) * 1000)
                t0 = time.perf_counter()
                try:
                    client.predict(handle_file(str(EXAMPLE)), "no-such-class", api_name="/predict")
                except Exception:  # noqa: BLE001 - the refusal is the point: transport only
                    pass
                if i >= 2:
                    refused.append((time.perf_counter() - t0) * 1000)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"client_round_trip_ms": round(statistics.median(wall), 1),
            "server_latency_ms": round(statistics.median(server), 1),
            "refused_call_round_trip_ms": round(statistics.median(refused), 1),
            "client_upload_and_join_ms": round(statistics.median(to_join), 1),
            "httpx_client_construction_ms": httpx_client_ms()}


def httpx_client_ms(repeats: int = 10) -> float:
    """Building one ``httpx.Client`` (its SSL context): gradio_client builds one for the upload and
    one for the queue join of every call (``httpx.post``), then polls for the answer every 50 ms."""
    import httpx

    def build():
        httpx.Client().close()

    return median_ms(build, repeats)


def main(argv: list[str] | None = None) -> int:
    from modeling.cli import add_flag, parse
    from modeling.paths import shown_path
    from modeling.predict import resolve_revision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flag(ap, "--model", default=str(ROOT / "space" / "model"))
    add_flag(ap, "--output", default=str(ROOT / "benchmarks" / "results" / "space_latency.json"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = parse(ap, argv)
    import torch

    torch.set_num_threads(args.threads)
    s = stages(args.model, args.repeats)
    rt = round_trip(args.model, args.repeats, args.threads)
    shared = round_trip(args.model, args.repeats, args.threads, shared_ssl_context=True)
    shared.pop("httpx_client_construction_ms")
    ref = s["predictor_predict_gradcam"]
    out = {"model": shown_path(args.model), "model_revision": resolve_revision(args.model), "threads": args.threads,
           "repeats": args.repeats, "example": EXAMPLE.name, "stages_ms": s, **rt,
           "round_trip_over_predictor": round(rt["client_round_trip_ms"] / ref, 2),
           "shared_ssl_context": {**shared,
                                  "round_trip_over_predictor": round(shared["client_round_trip_ms"] / ref, 2)},
           "targets": {"round_trip_over_predictor": 1.5, "client_round_trip_ms": 150}}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The private page (/private/): the model in the visitor's browser (issue: private mode).

The pixel code is run in Node against Pillow (it must reproduce the server's preprocessing exactly);
the page is driven in headless Chromium against a running Space: its answers match the server's,
no request carries the film, and it works with every request outside its origin blocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from synthetic import xray_like

PIXELS = ROOT / "space" / "private" / "page" / "pixels.mjs"
GATE = ROOT / "space" / "private" / "page" / "gate.mjs"
EXAMPLES = sorted((ROOT / "space" / "examples").glob("kermany_*.jpeg"))
CHROMIUM = "/usr/bin/chromium"
NODE = shutil.which("node")


def run_node(tmp_path: Path, body: str) -> None:
    script = tmp_path / "run.mjs"
    script.write_text(f'import * as px from "{PIXELS.as_posix()}";\nimport * as gt from "{GATE.as_posix()}";\n'
                      f'import fs from "fs";\n{body}\n')
    subprocess.run([NODE, str(script)], check=True, timeout=120)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("size", [(300, 250), (224, 224), (1000, 1300), (150, 120), (90, 400)])
def test_the_pages_resize_is_pillows_bicubic_to_the_last_grey_level(tmp_path, size):
    img = xray_like(3, size)
    (tmp_path / "in.bin").write_bytes(np.asarray(img).tobytes())
    run_node(tmp_path, f"""const g = new Uint8Array(fs.readFileSync("{tmp_path}/in.bin"));
fs.writeFileSync("{tmp_path}/out.bin", Buffer.from(px.resizeBicubic(g, {size[0]}, {size[1]}, 224, 224)));""")
    got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.uint8).reshape(224, 224)
    np.testing.assert_array_equal(got, np.asarray(img.resize((224, 224), Image.Resampling.BICUBIC)))


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_pages_gray_and_pixel_values_are_the_processors(tmp_path):
    """RGB -> gray as Pillow's convert("L"), then the saved image processor's output (float32)."""
    from modeling.predict import Predictor  # noqa: F401  (the processor as the Predictor loads it)
    from modeling.preprocessing import pixel_values
    from transformers import AutoImageProcessor

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((90, 120, 1), 255, np.uint8)], axis=2)
    (tmp_path / "in.bin").write_bytes(rgba.tobytes())
    processor = AutoImageProcessor.from_pretrained(ROOT / "space" / "model", backend="pil")
    cfg = {"width": 224, "height": 224, "rescale_factor": processor.rescale_factor,
           "image_mean": processor.image_mean, "image_std": processor.image_std}
    run_node(tmp_path, f"""const rgba = new Uint8Array(fs.readFileSync("{tmp_path}/in.bin"));
const g = px.rgbaToGray(rgba, 120, 90);
fs.writeFileSync("{tmp_path}/gray.bin", Buffer.from(g));
const pv = px.pixelValues(g, 120, 90, {json.dumps(cfg)});
fs.writeFileSync("{tmp_path}/pv.bin", Buffer.from(pv.buffer));""")
    gray = Image.fromarray(rgb).convert("L")
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "gray.bin").read_bytes(), np.uint8).reshape(90, 120),
                                  np.asarray(gray))
    ours = np.frombuffer((tmp_path / "pv.bin").read_bytes(), np.float32).reshape(1, 3, 224, 224)
    np.testing.assert_allclose(ours, pixel_values(processor, [gray]).numpy(), atol=1e-6)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_pages_turn_and_invert_are_the_gates(tmp_path):
    """A film the gate finds turned is turned back with Pillow's exact rotation, as the server does."""
    from modeling.gate import invert, turn

    img = xray_like(5, (70, 40))
    (tmp_path / "in.bin").write_bytes(np.asarray(img).tobytes())
    run_node(tmp_path, f"""const g = new Uint8Array(fs.readFileSync("{tmp_path}/in.bin"));
for (const d of [90, 180, 270, -90]) {{
  const t = px.turnGray(g, 70, 40, d);
  fs.writeFileSync(`{tmp_path}/turn${{d}}.bin`, Buffer.from(t.gray));
  fs.writeFileSync(`{tmp_path}/turn${{d}}.json`, JSON.stringify([t.width, t.height]));
}}
fs.writeFileSync("{tmp_path}/inv.bin", Buffer.from(px.invertGray(g)));""")
    for d in (90, 180, 270, -90):
        want = np.asarray(turn(img, d))
        w, h = json.loads((tmp_path / f"turn{d}.json").read_text())
        got = np.frombuffer((tmp_path / f"turn{d}.bin").read_bytes(), np.uint8).reshape(h, w)
        np.testing.assert_array_equal(got, want, err_msg=str(d))
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "inv.bin").read_bytes(), np.uint8).reshape(40, 70),
                                  np.asarray(invert(img)))


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_pages_gate_gives_the_servers_verdicts(tmp_path):
    """gate.mjs on gate.bin against InputGate.verdicts on the same features: the same turn, inversion,
    refusal and caution, the same distance."""
    from test_onnx import tiny_gate

    from modeling.gate import InputGate
    from modeling.onnx_export import write_gate

    gate = tiny_gate(24, seed=3, scale=3.0)
    rng = np.random.default_rng(1)
    feats = np.concatenate([rng.normal(size=(40, 24)), gate.mean + 0.2 * rng.normal(size=(10, 24))]).astype(np.float32)
    # limits between the features' distances, so accepted, cautioned and refused films all occur
    gate.caution_limit, gate.distance_limit = np.quantile(gate.distances(feats), [0.3, 0.7]).tolist()
    spec = write_gate(gate, tmp_path / "gate.bin")
    saved = InputGate.load(gate.save(tmp_path / "g.npz"))  # the numbers as float32, as gate.bin holds them
    for head in (saved.orientation, saved.polarity):
        head.weight, head.bias = head.weight.astype(np.float32), head.bias.astype(np.float32)
    saved.mean = saved.mean.astype(np.float32)
    (tmp_path / "f.bin").write_bytes(feats.tobytes())
    run_node(tmp_path, f"""const spec = {json.dumps(spec)};
const buf = fs.readFileSync("{tmp_path}/gate.bin");
const g = gt.parseGate(spec, buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length));
const f = new Float32Array(fs.readFileSync("{tmp_path}/f.bin").buffer.slice(0));
const out = [];
for (let i = 0; i < {len(feats)}; i++) out.push(gt.gateVerdict(f.subarray(i * 24, (i + 1) * 24), g));
fs.writeFileSync("{tmp_path}/out.json", JSON.stringify(out));""")
    got = json.loads((tmp_path / "out.json").read_text())
    want = saved.verdicts(feats)
    assert {w.out_of_distribution for w in want} == {True, False} and any(w.unusual for w in want)
    assert len({w.rotation for w in want}) > 1 and {w.inverted for w in want} == {True, False}
    for g, w in zip(got, want):
        assert (g["rotation"], g["inverted"], g["outOfDistribution"], g["unusual"]) == (
            w.rotation, w.inverted, w.out_of_distribution, w.unusual)
        assert g["distance"] == pytest.approx(w.distance, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# the page in Chromium, against the running Space on the released model
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def released_app(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    onnx = ROOT / "space" / "model" / "onnx"
    if not (onnx / "browser.json").exists():
        pytest.skip("space/model/onnx is missing: bash scripts/dev.sh setup exports it")
    if not (ROOT / "space" / "private" / "node_modules" / "onnxruntime-web").is_dir():
        pytest.skip("onnxruntime-web is not installed: bash scripts/dev.sh setup runs npm ci in space/private")
    from test_space import start_app

    running = start_app(ROOT / "space" / "model", tmp_path_factory.mktemp("private-app"),
                        {"CXR_PRECISION": "float32", "OMP_NUM_THREADS": "2"})
    yield running
    running.proc.terminate()
    running.proc.wait(timeout=60)


def _browser(p):
    sys.path.insert(0, str(ROOT / "scripts"))
    from space_screenshot import CHROMIUM_ARGS

    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _open_private(p, app):
    """Chromium on the page, its model loaded, every request outside the page's origin blocked:
    (browser, page, requests), requests being (method, url, body) of every request the page made from
    then on (blocked ones included); the caller closes the browser."""
    browser = _browser(p)
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append((r.method, r.url, r.post_data_buffer)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(app.url) else route.abort())
    page.goto(app.url + "private/")
    page.wait_for_function("() => window.cxrPrivate && window.cxrPrivate.ready", timeout=120_000)
    return browser, page, requests


def _sent_nothing(requests, app) -> None:
    assert not any(body for _, _, body in requests), requests  # no request carries a body
    assert all(url.startswith(app.url) for _, url, _ in requests), requests


def _choose(page, film: Path, run: int) -> dict:
    page.locator("input[type=file]").set_input_files(str(film))
    page.wait_for_function(f"() => document.querySelector('[data-testid=private-result]').dataset.run === '{run}'",
                           timeout=120_000)
    el = page.locator("[data-testid=private-result]")
    return {"probabilities": json.loads(el.get_attribute("data-probabilities")), "label": el.get_attribute("data-label"),
            "decision": el.get_attribute("data-decision")}


def _server(app, film: Path) -> dict:
    from gradio_client import Client, handle_file

    return Client(app.url, verbose=False).predict(handle_file(str(film)), "predicted", api_name="/predict")


def test_the_page_answers_the_examples_like_the_server_and_sends_no_film(released_app):
    from playwright.sync_api import sync_playwright

    served = {f.name: _server(released_app, f) for f in EXAMPLES}
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append((r.method, r.url, r.post_data_buffer)))
            page.goto(released_app.url + "private/")
            assert page.locator("input[type=file]").count() == 1
            assert "never leaves this device" in page.locator("[data-testid=privacy]").inner_text()
            page.wait_for_function("() => window.cxrPrivate && window.cxrPrivate.ready", timeout=120_000)
            before = len(requests)
            for run, film in enumerate(EXAMPLES, start=1):
                got = _choose(page, film, run)
                want = served[film.name]
                assert got["probabilities"] == pytest.approx(want["probabilities"], abs=0.02), film.name
                assert got["decision"] == want["decision"] and (got["label"] or None) == want["label"], film.name
            after = requests[before:]
            assert not any(body for _, _, body in after), after  # no request carries a body
            assert all(url.startswith(released_app.url) for _, url, _ in requests)
            assert page.locator("#heatmap").evaluate("c => c.width > 0 && c.height > 0")
        finally:
            browser.close()


def test_the_page_works_with_everything_outside_its_origin_blocked(released_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            blocked = []

            def only_same_origin(route):
                if route.request.url.startswith(released_app.url):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_same_origin)
            page.goto(released_app.url + "private/")
            page.wait_for_function("() => window.cxrPrivate && window.cxrPrivate.ready", timeout=120_000)
            got = _choose(page, EXAMPLES[0], 1)
            assert set(got["probabilities"]) == {"normal", "bacterial_pneumonia", "viral_pneumonia"}
        finally:
            browser.close()


def test_the_page_refuses_what_is_not_a_film_without_sending_it(released_app, tmp_path):
    from playwright.sync_api import sync_playwright

    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = np.linspace(0, 255, 200)[None, :], np.linspace(255, 0, 200)[:, None]
    photo = tmp_path / "photo.png"
    Image.fromarray(rgb).save(photo)
    with sync_playwright() as p:
        browser, page, requests = _open_private(p, released_app)
        try:
            page.locator("input[type=file]").set_input_files(str(photo))
            page.wait_for_function("() => document.querySelector('[data-testid=private-result]').dataset.decision",
                                   timeout=60_000)
            el = page.locator("[data-testid=private-result]")
            assert el.get_attribute("data-decision") == "refused" and "colour image" in page.locator("#verdict").inner_text()
            _sent_nothing(requests, released_app)
        finally:
            browser.close()


def test_the_page_puts_a_turned_film_right_and_refuses_what_the_gate_refuses_like_the_server(released_app, tmp_path):
    """The learned gate in the browser: a turned film is turned upright and answered as the server
    answers it (with the same note); grey photographs and screenshots are refused, some by the gate
    itself (the rules let them through)."""
    from gradio_client.exceptions import AppError
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from input_gate import negatives

    turned = tmp_path / "turned.png"
    Image.open(EXAMPLES[0]).convert("L").rotate(90, expand=True).save(turned)
    want = _server(released_app, turned)
    assert want["gate"]["rotation"] == 90  # the server turned it back
    neg = negatives()
    others = []
    for i, data in enumerate(neg["photographs"][:3] + neg["screenshots"][:3]):
        others.append(tmp_path / f"negative{i}.png")
        Image.open(__import__("io").BytesIO(data)).save(others[-1])
        with pytest.raises(AppError, match="does not look like a frontal chest X-ray"):
            _server(released_app, others[-1])
    with sync_playwright() as p:
        browser, page, requests = _open_private(p, released_app)
        try:
            before = len(requests)
            got = _choose(page, turned, 1)
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=0.02)
            assert got["decision"] == want["decision"] and (got["label"] or None) == want["label"]
            el = page.locator("[data-testid=private-result]")
            assert json.loads(el.get_attribute("data-gate"))["rotation"] == 90
            assert "turned by 90 degrees" in page.locator("#notes").inner_text()
            by_gate = 0
            for run, film in enumerate(others, start=2):
                page.locator("input[type=file]").set_input_files(str(film))
                page.wait_for_function(f"() => document.querySelector('[data-testid=private-result]').dataset.run === '{run}'",
                                       timeout=60_000)
                assert el.get_attribute("data-decision") == "refused", film.name
                gate = el.get_attribute("data-gate")
                by_gate += bool(gate and json.loads(gate)["out_of_distribution"])
            assert by_gate >= 1  # the learned gate refused what the rules let through
            assert any(url.endswith("/gate.bin") for _, url, _ in requests[:before])  # from the page's origin
            _sent_nothing(requests[before:], released_app)  # the films, turned back or refused, stayed here
        finally:
            browser.close()


def test_the_private_routes_send_the_isolation_and_content_policy_headers(released_app):
    for path in ("private/", "private/app.mjs", "private/model/browser.json", "private/ort/ort.wasm.min.js"):
        with urllib.request.urlopen(released_app.url + path, timeout=30) as r:
            assert r.status == 200, path
            assert "connect-src 'self'" in r.headers["Content-Security-Policy"], path
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp", path


def test_the_model_route_serves_files_that_are_symlinks_as_in_the_hub_cache(tmp_path, monkeypatch):
    """A Hub model's files live in the cache as symlinks into blobs/; Starlette refuses links unless told."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    import space.private_mode as pm

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc" / "onnx"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "1").write_text(json.dumps({"variants": {"float32": {"file": "onnx/model.onnx", "shipped": True}}}))
    (blobs / "2").write_bytes(b"graph")
    (snap / "browser.json").symlink_to(blobs / "1")
    (snap / "model.onnx").symlink_to(blobs / "2")
    monkeypatch.setattr(pm, "onnx_folder", lambda model_id, revision=None: snap)
    client = TestClient(Starlette(routes=pm.routes("org/model")))
    r = client.get("/private/model/model.onnx")
    assert r.status_code == 200 and r.content == b"graph"
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/private/").status_code == 200 and "never leaves this device" in client.get("/private/").text


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_pages_working_size_and_transparency_are_the_loaders(tmp_path):
    """A film over the working size is reduced as modeling.image_io does (box beyond twice the size, else
    Lanczos), and a transparent pixel is composited onto black first."""
    from modeling.image_io import WORKING_SIDE, load_image

    rng = np.random.default_rng(1)
    for size in ((2600, 2100), (5000, 4200)):
        img = xray_like(7, size)
        (tmp_path / "in.bin").write_bytes(np.asarray(img).tobytes())
        run_node(tmp_path, f"""const g = new Uint8Array(fs.readFileSync("{tmp_path}/in.bin"));
const r = px.fitSide(g, {size[0]}, {size[1]}, {WORKING_SIDE});
fs.writeFileSync("{tmp_path}/out.bin", Buffer.from(r.gray));
fs.writeFileSync("{tmp_path}/size.json", JSON.stringify([r.width, r.height]));""")
        png = tmp_path / "big.png"
        img.save(png)
        ref = load_image(png, max_side=WORKING_SIDE)
        assert tuple(json.loads((tmp_path / "size.json").read_text())) == ref.size
        got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.uint8).reshape(ref.size[1], ref.size[0])
        np.testing.assert_array_equal(got, np.asarray(ref))
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    (tmp_path / "in.bin").write_bytes(rgba.tobytes())
    run_node(tmp_path, f"""const g = px.rgbaToGray(new Uint8Array(fs.readFileSync("{tmp_path}/in.bin")), 50, 40);
fs.writeFileSync("{tmp_path}/out.bin", Buffer.from(g));""")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "out.bin").read_bytes(), np.uint8).reshape(40, 50),
                                  np.asarray(load_image(tmp_path / "alpha.png")))

"""The Gradio Space: pediatric chest X-ray triage with calibrated probabilities, Grad-CAM and
clinician feedback.

    cxr-space                                # the bundled model (space/model), http://127.0.0.1:7860
    MODEL_ID=org/model python -m space.app   # any model saved by train.py (Hub id or folder)

Settings (environment variables):

* ``MODEL_ID``: Hub id or folder of the model (default: ``model/`` beside this file).
* ``MODEL_REVISION``: Hub revision to pin.
* ``CXR_DATA_DIR``: where the prediction/feedback database and de-identified images live
  (default ``data/`` beside this file; on a Space use persistent storage, ``/data``).
* ``CXR_PRECISION``: ``auto`` (default: bfloat16 where the CPU has it natively), ``float32``, ``bfloat16``.
* ``CXR_BACKEND``: ``auto`` (default: at start-up, time the torch fast path and onnxruntime on the model's
  ``onnx/model.onnx`` and keep the faster), ``torch`` or ``onnx``; Grad-CAM always runs on torch.
* ``CXR_COMPILE``: ``1`` (default) compiles the plain-prediction network with TorchInductor at start-up
  (tens of seconds; then a plain prediction, as batch rows make, takes about a tenth less time on CPU;
  kept eager if it fails or disagrees); ``0`` skips it.
* ``CXR_UNCERTAIN_HIGH``: upper end of the "uncertain, refer" band (default: halfway from the
  model's threshold to 1, at least 0.5).
* ``FEEDBACK_REPO`` + ``HF_TOKEN``: push the feedback export to this Hub dataset every
  ``FEEDBACK_SYNC_MINUTES`` (default 10) with huggingface_hub's CommitScheduler.
* ``CXR_ADMIN_TOKEN`` (a secret) and/or ``CXR_ADMINS`` (Hugging Face user names, on a Space): who may
  export the feedback and see the History tab (:mod:`access`). Neither set: nobody.
* ``CXR_TMP_DIR``: where the private temp folder for uploads and outputs is made (a ``cxr-space-<uid>``
  folder of its own inside it; Gradio's ``GRADIO_TEMP_DIR`` is pointed at that); ``CXR_TMP_MAX_AGE_S``
  (default 600): anything in it older than this is deleted.
* ``CXR_STAGING_DAYS`` (default 7) / ``CXR_STAGING_MAX_MB`` (default 2048): how long and how much of
  the de-identified pixels of predicted images are kept for later feedback.
* Limits: ``CXR_MAX_UPLOAD_MB`` (per uploaded file, default 256: a zip of a batch), ``CXR_MAX_SIDE``
  (working size, default 2048 px: larger films are reduced while decoding), ``CXR_MAX_BATCH_FILES``
  (200), ``CXR_QUEUE_SIZE`` (64 waiting calls; more are refused with "queue is full").
* ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``: Gradio's own.

API (``gradio_client``): ``/predict`` (file, heatmap_class -> result dict with the heatmap as inline
PNG), ``/feedback`` (prediction_id, label, role, note -> dict), ``/batch`` (files -> table, CSV),
``/export`` (administrators: -> zip of the manifest export). See the README.
"""

from __future__ import annotations

import base64
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .files import ClaimUploads, TempFiles, UploadGone, private_temp_dir

# Gradio reads its temp folder when it is imported and when components are built: point it at the
# Space's private folder first (space/files.py says why).
os.environ["GRADIO_TEMP_DIR"] = str(private_temp_dir(os.environ.get("GRADIO_TEMP_DIR")))

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from modeling.image_io import IMAGE_EXTENSIONS, WORKING_SIDE  # noqa: E402
from modeling.archive import error_row  # noqa: E402
from modeling.labels import LABELS  # noqa: E402
from modeling.model_thread import ModelThread  # noqa: E402
from modeling.paths import file_sha256  # noqa: E402
from modeling.predict import Predictor  # noqa: E402

from .access import AccessDenied, AccessPolicy, request_token  # noqa: E402
from .output_file import OutputFile, served  # noqa: E402
from .private_mode import routes as private_routes  # noqa: E402
from .service import (LABEL_NAMES, MAX_UPLOAD_BYTES, CxrService, InputError, analytics,  # noqa: E402
                      heatmap_overlay, rows_to_csv)
from .store import ROLES, FeedbackStore, StoreError  # noqa: E402

HERE = Path(__file__).resolve().parent

DISCLAIMER = (
    "**Research prototype, not a medical device.** It has not been cleared or approved for clinical use. "
    "It was trained and tested on pediatric (age 1-5) frontal chest X-rays from one hospital; it does not "
    "know other ages, views, devices or diseases. Do not use it to diagnose or treat anyone. "
    "Do not upload images with names or other identifiers burned into the pixels."
)
HEATMAP_CHOICES = ["predicted"] + list(LABELS)
FILE_TYPES = sorted(IMAGE_EXTENSIONS)


@dataclass
class AppConfig:
    model_id: str
    revision: str | None
    data_dir: Path
    precision: str = "auto"
    backend: str = "auto"
    compile: bool = True
    uncertain_high: float | None = None
    feedback_repo: str | None = None
    sync_minutes: float = 10.0
    feedback_license: str = "CC-BY-4.0"
    tmp_max_age_s: float = 600.0
    staging_days: float = 7.0
    staging_max_mb: float = 2048.0
    max_upload_mb: float = 256.0
    pending_uploads_mb: float = 2048.0
    max_side: int = WORKING_SIDE
    max_batch_files: int = 200
    queue_size: int = 64

    @classmethod
    def from_env(cls) -> "AppConfig":
        env = os.environ
        high = env.get("CXR_UNCERTAIN_HIGH")
        return cls(
            model_id=env.get("MODEL_ID") or str(HERE / "model"),
            revision=env.get("MODEL_REVISION") or None,
            data_dir=Path(env.get("CXR_DATA_DIR") or default_data_dir()),
            precision=env.get("CXR_PRECISION", "auto"),
            backend=env.get("CXR_BACKEND", "auto"),
            compile=env.get("CXR_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off"),
            uncertain_high=float(high) if high else None,
            feedback_repo=env.get("FEEDBACK_REPO") or None,
            sync_minutes=float(env.get("FEEDBACK_SYNC_MINUTES", "10")),
            tmp_max_age_s=float(env.get("CXR_TMP_MAX_AGE_S", "600")),
            staging_days=float(env.get("CXR_STAGING_DAYS", "7")),
            staging_max_mb=float(env.get("CXR_STAGING_MAX_MB", "2048")),
            max_upload_mb=float(env.get("CXR_MAX_UPLOAD_MB", "256")),
            pending_uploads_mb=float(env.get("CXR_PENDING_UPLOADS_MB", "2048")),
            max_side=int(env.get("CXR_MAX_SIDE", str(WORKING_SIDE))),
            max_batch_files=int(env.get("CXR_MAX_BATCH_FILES", "200")),
            queue_size=int(env.get("CXR_QUEUE_SIZE", "64")),
        )


def default_data_dir() -> Path:
    """``/data/cxr-space`` on a Space with persistent storage (it survives restarts), else
    ``data/`` beside this file."""
    persistent = Path("/data")
    if persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent / "cxr-space"
    return HERE / "data"


def examples() -> list[str]:
    folder = HERE / "examples"
    return sorted(str(p) for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _label_dict(probabilities: dict) -> dict:
    return {LABEL_NAMES[k]: float(v) for k, v in probabilities.items()}


def _info_md(service: CxrService, a) -> str:
    notes = "".join(f"\n- {n}" for n in a.notes)
    what = ("prediction + Grad-CAM, CPU) · heatmap for " f"**{LABEL_NAMES[a.prediction.heatmap_class]}**"
            if a.prediction.heatmap_class else "prediction, CPU)")
    return (f"Inference {a.latency_ms:.0f} ms ({what} · model `{service.predictor.model_id}` "
            f"revision `{service.predictor.revision}` · prediction id `{a.prediction_id}`"
            + (f"\n\nThe file was converted on loading:{notes}" if notes else ""))


def overlay_png(image, heatmap, alpha: float, max_side: int = 1024) -> bytes:
    """The Grad-CAM overlay as PNG bytes, at most ``max_side`` px: returned inline (data, not a file in
    Gradio's cache that anyone with the URL could fetch). The film and the map are brought to display
    size first, so a 3000 px film is blended and encoded at display size, not at full size."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        heatmap = np.asarray(Image.fromarray(np.asarray(heatmap, np.float32), "F").resize(
            image.size, Image.Resampling.BILINEAR))
    over = Image.fromarray(heatmap_overlay(image, heatmap, alpha))
    buf = io.BytesIO()
    # zlib level 1: a quarter of the default level's time (4 ms against 15 ms for the 224 px example,
    # benchmarks/space_latency.py) for a file ~15% larger; the pixels are the same
    over.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def overlay_html(image, heatmap, alpha: float) -> str:
    data = base64.b64encode(overlay_png(image, heatmap, alpha, max_side=768)).decode()
    return (f'<img src="data:image/png;base64,{data}" alt="Grad-CAM heatmap overlay" '
            'style="max-width:100%;height:auto;display:block;margin:auto">')


def display_copies(image, heatmap, max_side: int = 768) -> dict:
    """What a browser session keeps to re-blend the heatmap when the opacity changes: the film and its
    heatmap at display size, the heatmap as 8-bit (not the full-size float32 arrays: a session
    holds them for an hour after the tab closes)."""
    small = image.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(small.size, Image.Resampling.BILINEAR)
    return {"image": small, "heatmap": np.asarray(heat, dtype=np.uint8)}


OUT_OF_SCOPE_TITLE = "Outside what this model knows: no answer"
LOCKED = "Administrators only: the history and the export show what clinicians stored."


def build_app(service: CxrService, config: AppConfig, files: TempFiles | None = None,
              access: AccessPolicy | None = None) -> gr.Blocks:
    """The Blocks app around a :class:`CxrService` (tests build it with a tiny model)."""
    files = files or TempFiles(Path(os.environ["GRADIO_TEMP_DIR"]), max_age_s=config.tmp_max_age_s, keep=_is_example,
                                 pending_max_bytes=int(config.pending_uploads_mb * 2**20))
    access = access or AccessPolicy.from_env()

    def take(upload) -> bytes:
        """The upload's bytes; the file is released (gone from disk once the last request given it is done)."""
        try:
            return files.consume(upload, max_bytes=MAX_UPLOAD_BYTES)
        except UploadGone:
            raise gr.Error("The uploaded file is gone: uploads are deleted once analysed and after "
                           f"{config.tmp_max_age_s / 60:g} minutes. Upload it again.", title="Input not accepted") from None
        except ValueError as exc:
            raise gr.Error(str(exc), title="Input not accepted") from None

    def admin(token: str | None, profile) -> None:
        try:
            access.require(token=token, username=getattr(profile, "username", None))
        except AccessDenied as exc:
            raise gr.Error(str(exc), title="Not allowed") from None

    # ---------------- handlers (UI) ----------------
    def ui_predict(file, heatmap_class, alpha):
        if not file:
            raise gr.Error("Upload a chest X-ray first (JPEG, PNG, TIFF or DICOM).")
        try:
            a = service.analyze(take(file), target_class=heatmap_class, channel="ui")
        except InputError as exc:
            raise gr.Error(str(exc), title="Input not accepted") from None
        if a.decision == "out_of_scope":  # no label, no call, no heatmap: the output only behind a disclosure
            state = {"prediction_id": a.prediction_id, "image_sha256": a.image_sha256, "label": None}
            return (None, f"### {OUT_OF_SCOPE_TITLE}\n\n{a.verdict}", "", _info_md(service, a), state,
                    gr.update(value=None, interactive=False), gr.update(interactive=False),
                    "Feedback is not taken for a film outside the model's scope.",
                    gr.update(visible=True, open=False), _label_dict(a.prediction.probabilities))
        verdict = f"### {LABEL_NAMES[a.prediction.label]}\n\n{a.verdict}"
        state = {"prediction_id": a.prediction_id, "image_sha256": a.image_sha256, "label": a.prediction.label,
                 **display_copies(a.image, a.prediction.heatmap)}
        return (_label_dict(a.prediction.probabilities), verdict, overlay_html(a.image, a.prediction.heatmap, alpha),
                _info_md(service, a), state, gr.update(value=a.prediction.label, interactive=True),
                gr.update(interactive=True), "", gr.update(visible=False, open=False), None)

    def ui_heatmap_class(state, heatmap_class, alpha):
        if not state or state.get("label") is None:  # nothing analysed, or out of scope: no heatmap
            return gr.skip()
        image = service.staged_image(state["image_sha256"])  # the full film, kept for feedback
        if image is None:
            raise gr.Error("This film is no longer kept on the server: analyse it again.")
        try:
            pred = service.heatmap(image, heatmap_class)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        state = {**state, **display_copies(image, pred.heatmap)}
        return overlay_html(image, pred.heatmap, alpha), state

    def ui_alpha(state, alpha):
        if not state or "heatmap" not in state:
            return gr.skip()
        return overlay_html(state["image"], state["heatmap"] / 255.0, alpha)

    def ui_feedback(state, label, role, note, consent):
        if not state:
            raise gr.Error("Analyse an image first, then give your reading.")
        if state.get("label") is None:
            raise gr.Error("Feedback is not taken for a film outside the model's scope.")
        if consent is not True:
            raise gr.Error("Please confirm that the image carries no identifying information and that you agree "
                           f"to share your reading and the de-identified image under {config.feedback_license}.")
        try:
            fid = service.feedback(state["prediction_id"], label, role, note, consent=consent is True)
        except StoreError as exc:
            raise gr.Error(str(exc)) from None
        verb = "confirmed" if label == state["label"] else f"corrected to {LABEL_NAMES[label]}"
        return f"Thank you: feedback #{fid} stored ({verb})."

    # ---------------- handlers (API) ----------------
    def api_predict(file, heatmap_class="predicted"):
        """Classify one chest X-ray file. Returns the result dict; ``heatmap_png`` is the Grad-CAM
        overlay as base64 PNG (at most 1024 px)."""
        if not file:
            raise gr.Error("No file given.")
        try:
            a = service.analyze(take(file), target_class=heatmap_class or "predicted", channel="api")
        except InputError as exc:
            raise gr.Error(str(exc), title="Input not accepted") from None
        heat = a.prediction.heatmap  # None for a film out of the model's scope
        return {**a.to_dict(),
                "heatmap_png": None if heat is None else base64.b64encode(overlay_png(a.image, heat, 0.4)).decode()}

    def api_feedback(prediction_id, label, role="not specified", note="", consent=False):
        """Store a clinician's label for a prediction id returned by /predict. ``consent`` must be true: the
        image carries no identifiers and the reading and de-identified image are shared under the
        feedback licence (the UI's checkbox)."""
        try:
            # only the boolean true is a yes: "false", "no" or {"a": 0} are truthy, and are refused
            fid = service.feedback(str(prediction_id), label, role or "not specified", note or "",
                                   consent=consent is True)
        except StoreError as exc:
            raise gr.Error(str(exc)) from None
        return {"feedback_id": fid, "prediction_id": prediction_id, "label": label}

    def batch(uploads, request: gr.Request, progress=gr.Progress()):
        paths = [f if isinstance(f, str) else f.name for f in (uploads or [])]
        if not paths:
            raise gr.Error("Upload one or more X-rays or a .zip of them.")
        # a path that is not an upload (a folder, a link, a scratch output...) is a row, never opened or deleted
        problems = {p: files.upload_problem(p) for p in paths}
        rows = service.batch([p for p in paths if not problems[p]], progress=lambda frac, desc: progress(frac, desc=desc),
                             release=files.release)
        rows += [{"#": len(rows) + i, "file": Path(p).name, **error_row("not_an_upload", f"This path was not accepted: {why}.")}
                 for i, (p, why) in enumerate(((p, w) for p, w in problems.items() if w), start=1)]
        out = rows_to_csv(rows, files.scratch("batch") / "predictions.csv")
        cols = ["#", "file", "label", "p_pneumonia", "decision", "error"]
        return pd.DataFrame(rows).reindex(columns=cols).fillna(""), served(files, request, out)

    def export_zip(request: gr.Request):
        """The feedback as a manifest folder, zipped in a scratch folder (the unzipped copy is removed)."""
        scratch = files.scratch("export", serve_once=True)  # its URL works once, not until the sweep
        staging = scratch / "manifest"
        summary = service.store.export_manifest(staging, license=config.feedback_license)
        zpath = scratch / "feedback-manifest.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(staging.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(staging).as_posix())
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        return served(files, request, zpath), summary

    def ui_export(token, request: gr.Request, profile: gr.OAuthProfile | None = None):
        admin(token, profile)
        return export_zip(request)

    def api_export(request: gr.Request):
        """Administrators: the clinician feedback as a manifest zip (send the X-CXR-Admin-Token header)."""
        admin(request_token(request), None)
        return export_zip(request)

    def history(token, profile: gr.OAuthProfile | None = None):
        if not access.is_admin(token=token, username=getattr(profile, "username", None)):
            empty = pd.DataFrame()
            return (LOCKED if access.enabled else LOCKED + " (no administrator is configured)",
                    pd.DataFrame({"day": [], "predictions": []}), pd.DataFrame({"label": [], "count": []}), empty, empty)
        return analytics(service.store)

    # ---------------- layout ----------------
    # No delete_cache: Gradio's cleanup deleted its cached copies of the examples (clicking one then
    # said "the uploaded file is gone"); the sweeper of space.files bounds every file's age instead
    # and keeps the examples.
    with gr.Blocks(title="Pediatric chest X-ray pneumonia triage") as demo:
        gr.Markdown("# Pediatric chest X-ray: normal, bacterial or viral pneumonia")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        state = gr.State(None)
        with gr.Tab("Predict", id="predict"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Chest X-ray (JPEG, PNG 8/16-bit, TIFF or DICOM)", type="filepath",
                                     file_types=FILE_TYPES, elem_id="upload")
                    heat_class = gr.Dropdown(HEATMAP_CHOICES, value="predicted", label="Heatmap for class",
                                             allow_custom_value=True, elem_id="heatmap-class")
                    alpha = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity", elem_id="opacity")
                    run = gr.Button("Analyse", variant="primary", elem_id="analyse")
                    if examples():
                        gr.Examples(examples(), inputs=upload, label="Example X-rays (Kermany et al., CC BY 4.0; "
                                "the DICOM is an adult's: outside the model's scope)")
                with gr.Column(scale=1):
                    probs = gr.Label(label="Calibrated probabilities", num_top_classes=3, elem_id="probs")
                    verdict = gr.Markdown(elem_id="verdict")
                    with gr.Accordion("Show the model's output anyway (unreliable: the film is outside what it "
                                      "was trained on)", open=False, visible=False, elem_id="scope-anyway") as anyway:
                        probs_anyway = gr.Label(label="Probabilities (unreliable)", num_top_classes=3,
                                                elem_id="probs-anyway")
                    gr.Markdown("**Grad-CAM: what drove the score**")
                    heat = gr.HTML(elem_id="heatmap", js_on_load=None)
                    info = gr.Markdown(elem_id="info")
            with gr.Group():
                gr.Markdown("### Clinician feedback\nConfirm or correct the model's reading. Stored with the "
                            "prediction and a de-identified copy of the pixels (no file name, no DICOM header).")
                with gr.Row():
                    fb_label = gr.Radio(list(LABELS), label="Your reading", interactive=False, elem_id="fb-label")
                    fb_role = gr.Dropdown(list(ROLES), value="not specified", label="Your role", elem_id="fb-role")
                fb_note = gr.Textbox(label="Note (optional; no patient identifiers)", max_length=1000,
                                     elem_id="fb-note")
                fb_consent = gr.Checkbox(label=f"The image has no identifiers in it, and I share my reading and the "
                                               f"de-identified image under {config.feedback_license}.",
                                         elem_id="fb-consent")
                fb_send = gr.Button("Submit feedback", interactive=False, elem_id="fb-send")
                fb_status = gr.Markdown(elem_id="fb-status")

        with gr.Tab("Batch", id="batch"):
            gr.Markdown(f"Many files or a .zip (up to {config.max_batch_files} images; every file gets a row, skipped "
                        "ones with the reason). No heatmaps. The CSV keeps row order and image hashes, not file names "
                        "(names can carry patient names).")
            b_files = gr.File(label="X-rays or .zip", file_count="multiple", type="filepath", elem_id="batch-files")
            b_run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
            b_table = gr.Dataframe(label="Results", interactive=False, elem_id="batch-table")
            b_csv = OutputFile(label="CSV", elem_id="batch-csv")

        with gr.Tab("History", id="history"):
            gr.Markdown("For administrators: what was predicted, what clinicians said, and the export of their "
                        "feedback as a dataset manifest.")
            with gr.Row():
                if access.oauth:
                    gr.LoginButton(elem_id="login")
                h_token = gr.Textbox(label="Administrator token", type="password", visible=bool(access.admin_token),
                                     elem_id="admin-token")
                h_refresh = gr.Button("Show / refresh", elem_id="history-refresh")
            h_summary = gr.Markdown(elem_id="history-summary")
            with gr.Row():
                h_time = gr.BarPlot(x="day", y="predictions", title="Predictions per day", elem_id="history-time")
                h_mix = gr.BarPlot(x="label", y="count", title="Predicted class mix", elem_id="history-mix")
            h_corr = gr.Dataframe(label="Model label (rows) vs clinician label (columns)", elem_id="history-agree")
            h_recent = gr.Dataframe(label="Latest feedback", elem_id="history-recent")
            with gr.Row():
                h_export = gr.Button("Export feedback as a dataset manifest", elem_id="export")
                h_zip = OutputFile(label="manifest.csv + images (for dataset_scripts)")
                h_export_info = gr.JSON(label="Export summary")

        with gr.Tab("About", id="about"):
            gr.Markdown(about_markdown(service, config))

        # hidden components carrying the API endpoints; free-text inputs so that no value is refused by
        # Gradio before our handler runs (which would leave the upload behind): the handlers validate
        with gr.Row(visible=False):
            api_file = gr.File(type="filepath")
            api_class = gr.Textbox(value="predicted")
            api_result = gr.JSON()
            api_pid = gr.Textbox()
            api_label = gr.Textbox()
            api_role = gr.Textbox(value="not specified")
            api_note = gr.Textbox()
            api_consent = gr.Checkbox(value=False)
            api_fb_out = gr.JSON()
            api_zip = OutputFile()
            api_export_info = gr.JSON()
            api_btn = gr.Button()
            api_fb_btn = gr.Button()
            api_export_btn = gr.Button()

        # ---------------- events ----------------
        # Single predictions and batches in separate groups: the model lock then lets a /predict
        # overtake a running batch between two of its images (service.ModelLock).
        predict_events = {"concurrency_id": "predict", "concurrency_limit": 2}
        run.click(ui_predict, [upload, heat_class, alpha],
                  [probs, verdict, heat, info, state, fb_label, fb_send, fb_status, anyway, probs_anyway],
                  api_visibility="private", **predict_events)
        heat_class.change(ui_heatmap_class, [state, heat_class, alpha], [heat, state], api_visibility="private",
                          **predict_events)
        alpha.release(ui_alpha, [state, alpha], heat, api_visibility="private")
        fb_send.click(ui_feedback, [state, fb_label, fb_role, fb_note, fb_consent], fb_status,
                      api_visibility="private", concurrency_limit=8)
        b_run.click(batch, b_files, [b_table, b_csv], api_name="batch", concurrency_id="batch", concurrency_limit=1
                    ).then(lambda: None, None, b_files, api_visibility="private", queue=False)  # its uploads are gone
        outs = [h_summary, h_time, h_mix, h_corr, h_recent]
        h_refresh.click(history, h_token, outs, api_visibility="private", concurrency_id="admin", concurrency_limit=2)
        demo.load(history, h_token, outs, api_visibility="private", concurrency_id="admin", concurrency_limit=2)
        h_export.click(ui_export, h_token, [h_zip, h_export_info], api_visibility="private", concurrency_id="admin",
                       concurrency_limit=2)
        api_export_btn.click(api_export, None, [api_zip, api_export_info], api_name="export", concurrency_id="admin",
                             concurrency_limit=2)
        api_btn.click(api_predict, [api_file, api_class], api_result, api_name="predict", **predict_events)
        api_fb_btn.click(api_feedback, [api_pid, api_label, api_role, api_note, api_consent], api_fb_out,
                         api_name="feedback",
                         concurrency_limit=16)
    return demo


def _is_example(path) -> bool:
    """True for a bundled example, also when Gradio hands over its cached copy of it (which must
    not be deleted: clicking the example again reuses that copy). Compared by content."""
    try:
        p = Path(path)
        if p.resolve().parent == (HERE / "examples").resolve():
            return True
        same_size = _example_digests().get(p.stat().st_size)
        return bool(same_size) and file_sha256(p) in same_size
    except OSError:
        return False


_EXAMPLE_DIGESTS: dict[int, set[str]] | None = None


def _example_digests() -> dict[int, set[str]]:
    global _EXAMPLE_DIGESTS
    if _EXAMPLE_DIGESTS is None:
        digests: dict[int, set[str]] = {}
        for e in examples():
            digests.setdefault(Path(e).stat().st_size, set()).add(file_sha256(e))
        _EXAMPLE_DIGESTS = digests
    return _EXAMPLE_DIGESTS


def about_markdown(service: CxrService, config: AppConfig) -> str:
    cal = service.predictor.calibration
    return f"""
**Model** `{service.predictor.model_id}` (revision `{service.predictor.revision}`), compute precision
`{service.predictor.precision}`, backend `{service.predictor.backend}`. Probabilities are temperature-calibrated on validation (T = {cal.temperature:.3f});
the pneumonia call uses P(bacterial) + P(viral) >= {cal.pneumonia_threshold:.3f}, chosen on validation for a
sensitivity of {cal.target_sensitivity}; from there up to {service.uncertain_high:.0%} the film is marked
"uncertain, refer". The heatmap is Grad-CAM (pytorch-grad-cam) on the last transformer block.

**Input gate.** Files go through one loader (JPEG, PNG 8/16-bit, TIFF, DICOM with its VOI LUT). Colour photos,
non-chest or lateral DICOM, tiny, blank or oddly shaped images are refused with the reason. The gate is a set
of simple rules, not a detector: a knee radiograph may pass it, and the model will still answer.

**What is stored.** Each prediction (time, model and revision, image hash, probabilities, decision) and, for
{config.staging_days:g} days, the image re-encoded from its pixels so that feedback sent later keeps it; with
feedback, the clinician's label, role and note, and that image. Never the file name or DICOM header; uploads
are deleted once read. The history and the export are for the Space's administrators.
"""


def make_service(config: AppConfig) -> CxrService:
    # loaded on the thread that will run every model call (modeling.model_thread: one OpenMP team)
    model_thread = ModelThread()
    predictor = model_thread.call(Predictor.from_pretrained, config.model_id, revision=config.revision,
                                  precision=config.precision, backend=config.backend)
    if Path(config.model_id).resolve() == (HERE / "model").resolve():
        predictor.model_id = "bundled:space/model"  # records and UI show a stable name, not a server path
    store = FeedbackStore(config.data_dir, staging_max_age_s=config.staging_days * 86400,
                          staging_max_bytes=int(config.staging_max_mb * 2**20))
    return CxrService(predictor, store, uncertain_high=config.uncertain_high, max_side=config.max_side,
                      max_batch_files=config.max_batch_files, model_thread=model_thread)


def prepare_serving(demo: gr.Blocks, service: CxrService, config: AppConfig) -> gr.Blocks:
    """What runs beside the app once it serves: the staging purge on a timer (a quiet Space makes no
    predictions to trigger it), the feedback sync when ``FEEDBACK_REPO`` is set, and Gradio's queue
    with ``CXR_QUEUE_SIZE`` places. Returns the queued app, ready to launch."""
    service.start_housekeeping()
    if config.feedback_repo:
        from .sync import start_feedback_sync
        start_feedback_sync(service.store, config.feedback_repo, every_minutes=config.sync_minutes,
                            license=config.feedback_license)
    return demo.queue(max_size=config.queue_size, default_concurrency_limit=4)


def main(argv: list[str] | None = None) -> None:
    """``cxr-space`` / ``python -m space.app``: serve the Space (settings: environment variables, see
    the module docstring)."""
    import argparse
    import atexit
    import signal

    ap = argparse.ArgumentParser(prog="cxr-space", description="Serve the pneumonia triage Space (Gradio) on the "
                                 "model in MODEL_ID (default: the bundled space/model).",
                                 epilog="Settings are environment variables: MODEL_ID, CXR_DATA_DIR, CXR_ADMIN_TOKEN, "
                                        "CXR_ADMINS, CXR_TMP_MAX_AGE_S, CXR_MAX_UPLOAD_MB, ... (docs/space.md); "
                                        "GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose the address.")
    ap.parse_args(argv)
    config = AppConfig.from_env()
    files = TempFiles(Path(os.environ["GRADIO_TEMP_DIR"]), max_age_s=config.tmp_max_age_s, keep=_is_example,
                                 pending_max_bytes=int(config.pending_uploads_mb * 2**20))
    files.sweep()  # what an earlier run left behind
    files.start_sweeper()
    atexit.register(files.clear)
    # SIGTERM (a Space restart, a redeploy, `kill`) closes like Ctrl-C: Gradio's launch() returns and the
    # temp folder is cleared on the way out (the default action would end the process without atexit)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    service = make_service(config)
    service.warmup(compile=config.compile)
    demo = prepare_serving(build_app(service, config, files, AccessPolicy.from_env()), service, config)
    demo.launch(
        theme=gr.themes.Soft(), max_file_size=int(config.max_upload_mb * 2**20), run_history=False,
        enable_monitoring=False, state_session_capacity=500,
        # uploads are counted on their way out (space.files.ClaimUploads); static workers would answer
        # uploads in processes the middleware never sees
        num_workers=0, app_kwargs={"middleware": [Middleware(ClaimUploads, files=files)],
                                   # /private/: the model in the visitor's browser (space/private_mode.py)
                                   "routes": private_routes(config.model_id, config.revision)})


if __name__ == "__main__":
    main()

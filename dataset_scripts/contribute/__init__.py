"""Check, de-identify and submit a contributor's dataset update (a folder of images + ``manifest.csv``).

    cxr-contribute validate SUBMISSION_DIR [--dataset DIR_OR_HUB_ID] [--output-dir DIR]
    cxr-contribute submit   SUBMISSION_DIR --repo REPO_ID [--dataset ...]
    cxr-contribute index-test-images KERMANY_DIR   # maintainers: refresh the index

Why a gate: one careless upload (a copy of a test image, a mislabelled batch, a DICOM with a
patient's name in it) silently poisons every later model and leaks personal data. ``validate`` runs
on the contributor's machine, before anything leaves it, and writes a *cleaned copy* that is the only
thing ``submit`` ever uploads.

Input: ``SUBMISSION_DIR/manifest.csv`` in the ``manifest`` format that ``dataset_scripts.build``
reads and the Space's feedback export writes (``path,label[,patient_id,license,contributor,note,
source]``, paths relative to the CSV) and the image files it lists (JPEG/PNG/TIFF/BMP/WebP/DICOM).

Per file (statuses ``ok`` / ``warning`` / ``dropped`` / ``blocked``):

- blocked: path unsafe (absolute, ``..``, symlink, outside the folder) or missing; undecodable by
  :func:`modeling.image_io.load_image` (empty, truncated, not an image, decompression bomb, ...);
  label outside our three classes; no licence; exact or near duplicate of an **official test image**
  (the committed :data:`TEST_INDEX` of the 624 Kermany test images, or the ``test`` split of
  ``--dataset``); same image as an existing dataset image with *another* label; copies inside the
  submission that disagree on the label; a DICOM flagged ``BurnedInAnnotation=YES`` (identifying text
  in the pixels, which no tag removal fixes); a note that repeats a value of the file's
  patient-identifying DICOM tags.
- dropped: duplicate of an image already in ``--dataset`` (same label) or of an earlier line of the
  submission: reported, not submitted.
- warning: does not look like a frontal chest X-ray (:func:`chest_xray_warnings`), DICOM not CR/DX,
  not a chest, or a lateral view; no patient id; a licence id we do not recognise.

Duplicates use the build's own fingerprints and threshold (:mod:`dataset_scripts.fingerprint`,
:data:`dataset_scripts.dedup.DEFAULT_NEAR_THRESHOLD`: 256-bit phash within 28 bits, with mirror and
+-2..10 degree rotations), so the gate and the build agree on what a copy is.

De-identification is by construction: every accepted image is re-encoded to PNG from the decoded
pixels (no DICOM header, EXIF, ICC or text chunk survives), renamed to its pixel hash (no
identifying file names), and ``patient_id`` values are replaced by per-submission pseudonyms (kept
equal within the submission so the build still groups a patient's images). The report names the
identifying DICOM tags that were present and removed, never their values. The manifest's free-text
``note`` is passed through: do not put personal data in it.

Output (``--output-dir``, default ``SUBMISSION_DIR/_clean``; what ``submit`` uploads is exactly the
first four)::

    manifest.csv          cleaned manifest (paths images/<hash>.png, canonical labels, pseudonyms)
    images/<hash16>.png   accepted images, re-encoded from pixels
    report.json           the validation report
    REPORT.md             the same as a summary table (the pull request description)

Reports and console output name files by their manifest line (and new name), never by the original
path: a file name can itself be personal data (``Doe_Jane_1970.dcm``).

Exit codes: 0 nothing blocking (warnings allowed), 1 blocking problems (``submit``: nothing was
uploaded), 2 usage errors (no such folder, no manifest.csv, unusable ``--dataset``), 3 the Hub
refused the upload.

On the dataset repo, a merged submission lives in ``contributions/<submission-id>/`` (the four files
above); ``cxr-build --source contributions:DIR_OR_REPO_ID`` takes every merged
contribution as a source (train/validation only, never test) and the dataset card lists them.

Modules: :mod:`.report` (the report), :mod:`.official_index` (the test index), :mod:`.checks`
(per-file checks), :mod:`.validate`, :mod:`.submit`, :mod:`.cli`.
"""

from .checks import chest_xray_warnings
from .cli import main
from .common import (CLEAN_DIRNAME, CONTRIBUTIONS_DIR, KNOWN_LICENSES, REPORT_VERSION, STATUSES, TEST_INDEX,
                     UPLOADED_FILES, UsageError)
from .official_index import RefImage, compute_test_index, load_dataset_refs, read_test_index, write_test_index
from .report import FileResult, ValidationReport
from .submit import SubmitResult, submit
from .validate import validate

__all__ = ["CLEAN_DIRNAME", "CONTRIBUTIONS_DIR", "KNOWN_LICENSES", "REPORT_VERSION", "STATUSES", "TEST_INDEX",
           "UPLOADED_FILES", "FileResult", "RefImage", "SubmitResult", "UsageError", "ValidationReport",
           "chest_xray_warnings", "compute_test_index", "load_dataset_refs", "main", "read_test_index", "submit",
           "validate", "write_test_index"]

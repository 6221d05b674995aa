"""``submit``: validate again and open a pull request on the Hub dataset repo."""

from __future__ import annotations


import os
from dataclasses import dataclass
from pathlib import Path


from .. import dedup
from .common import CONTRIBUTIONS_DIR, TEST_INDEX, UPLOADED_FILES
from .report import ValidationReport
from .validate import validate


@dataclass
class SubmitResult:
    report: ValidationReport
    pr_url: str | None = None
    pr_num: int | None = None
    path_in_repo: str = ""


def submit(submission_dir: str | os.PathLike, repo_id: str, dataset: str | None = None,
           output: str | os.PathLike | None = None, token: str | None = None,
           near_threshold: int = dedup.DEFAULT_NEAR_THRESHOLD,
           test_index: str | os.PathLike = TEST_INDEX) -> SubmitResult:
    """Validate, then open a pull request on the Hub dataset repo ``repo_id`` that adds the cleaned
    copy under ``contributions/<submission-id>/``, with the summary table as its description.
    Nothing is uploaded when validation finds a blocking problem (``result.pr_url`` is None)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    report = validate(submission_dir, dataset=dataset, output=output, near_threshold=near_threshold,
                      test_index=test_index)
    result = SubmitResult(report)
    if not report.ok:
        return result
    out = Path(report.output_dir)
    base = f"{CONTRIBUTIONS_DIR}/{report.submission_id}"
    api = HfApi(token=token)
    if api.file_exists(repo_id, f"{base}/manifest.csv", repo_type="dataset"):
        report.problems.append(f"{base} is already in {repo_id}: this submission was merged before")
        return result
    files = [*UPLOADED_FILES, *sorted(f"images/{p.name}" for p in (out / "images").glob("*.png"))]
    ops = [CommitOperationAdd(path_in_repo=f"{base}/{rel}", path_or_fileobj=str(out / rel)) for rel in files]
    c = report.counts()
    info = api.create_commit(
        repo_id, repo_type="dataset", operations=ops, create_pr=True,
        commit_message=f"Contribution {report.submission_id}: {c['ok'] + c['warning']} images",
        commit_description=report.markdown())
    result.pr_url, result.pr_num, result.path_in_repo = info.pr_url, info.pr_num, base
    return result

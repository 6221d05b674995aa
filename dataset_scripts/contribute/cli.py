"""``cxr-contribute`` (``python -m dataset_scripts.contribute``)."""

from __future__ import annotations


import argparse
import os
import sys
from pathlib import Path


from .. import dedup
from .common import CLEAN_DIRNAME, TEST_INDEX, UsageError
from .official_index import compute_test_index, write_test_index
from .report import ValidationReport
from .submit import submit
from .validate import validate


def _print_report(report: ValidationReport) -> None:
    print(report.markdown())
    if report.output_dir:
        print(f"cleaned copy and reports: {report.output_dir} (REPORT.md = what reviewers see)")
    print("result:", "passed" if report.ok else "BLOCKED (fix the problems above and run validate again)")


def main(argv: list[str] | None = None) -> int:
    from modeling.cli import add_flag, parse

    ap = argparse.ArgumentParser(prog="cxr-contribute", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("validate", "submit"):
        p = sub.add_parser(name, help=f"{name} a submission folder (images + manifest.csv)")
        p.add_argument("submission_dir", type=Path)
        p.add_argument("--dataset", metavar="DIR_OR_HUB_ID",
                       help="the existing dataset (built by dataset_scripts.build): duplicates of its "
                            "images are dropped, label conflicts blocked")
        add_flag(p, "--output-dir", old=("--output",), type=Path,
                 help=f"cleaned copy folder (default SUBMISSION_DIR/{CLEAN_DIRNAME})")
        p.add_argument("--near-threshold", type=int, default=dedup.DEFAULT_NEAR_THRESHOLD,
                       help="max Hamming distance (of 256 bits) for a near duplicate (default: the build's)")
        p.add_argument("--test-index", type=Path, default=TEST_INDEX, help=argparse.SUPPRESS)
        if name == "submit":
            p.add_argument("--repo", required=True, metavar="REPO_ID", help="the Hub dataset repo")
    p = sub.add_parser("index-test-images", help="recompute the committed official test index (maintainers)")
    p.add_argument("kermany_dir", type=Path)
    add_flag(p, "--output", old=("--out",), type=Path, default=TEST_INDEX, help="the index file written")
    args = parse(ap, argv)

    try:
        if args.command == "index-test-images":
            rows = compute_test_index(args.kermany_dir)
            if not rows:
                raise UsageError(f"{args.kermany_dir}: no official test images found")
            print(f"wrote {write_test_index(rows, args.output)} ({len(rows)} images)")
            return 0
        if args.command == "validate":
            report = validate(args.submission_dir, dataset=args.dataset, output=args.output_dir,
                              near_threshold=args.near_threshold, test_index=args.test_index)
            _print_report(report)
            return report.exit_code
        from huggingface_hub.errors import HfHubHTTPError

        try:
            result = submit(args.submission_dir, args.repo, dataset=args.dataset, output=args.output_dir,
                            token=os.environ.get("HF_TOKEN"), near_threshold=args.near_threshold,
                            test_index=args.test_index)
        except HfHubHTTPError as e:
            print(f"error: the Hub refused the upload: {e}", file=sys.stderr)
            return 3
        _print_report(result.report)
        if result.pr_url is None:
            print("nothing was uploaded", file=sys.stderr)
            return 1
        print(f"opened pull request #{result.pr_num}: {result.pr_url}")
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Constants and the usage error shared by the contribute modules."""

from __future__ import annotations


from pathlib import Path


CONTRIBUTIONS_DIR = "contributions"  # folder of merged submissions in the dataset repo
CLEAN_DIRNAME = "_clean"
TEST_INDEX = Path(__file__).resolve().parent.parent / "official_test_index.csv.gz"
UPLOADED_FILES = ("manifest.csv", "report.json", "REPORT.md")  # + images/*.png
REPORT_VERSION = 1

STATUSES = ("ok", "warning", "dropped", "blocked")

# Licence ids we recognise (SPDX, lower case). Others are accepted with a warning: the maintainer
# must check that the licence allows redistribution in a CC BY 4.0 dataset.
KNOWN_LICENSES = frozenset({
    "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-3.0", "cc-by-2.0", "pddl", "odc-by", "odbl",
    "mit", "apache-2.0", "bsd-3-clause", "cdla-permissive-2.0", "public-domain",
})


class UsageError(ValueError):
    """The command cannot run as asked (no folder, no manifest.csv, unusable --dataset): exit 2."""

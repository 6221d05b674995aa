"""Optional: push the feedback export to a Hub dataset repo on a schedule.

Uses huggingface_hub's :class:`~huggingface_hub.CommitScheduler` (a background thread that commits
a folder every N minutes, only when something changed). Before each push the store is exported
(:meth:`store.FeedbackStore.export_manifest`), so the repo always holds a complete ``manifest``
folder (``feedback/manifest.csv`` + ``feedback/images/``) that ``dataset_scripts`` can read:

    hf download ORG/cxr-feedback --repo-type dataset --local-dir fb
    python -m dataset_scripts.contribute validate fb/feedback      # then submit, or build from it

Enabled in the Space by ``FEEDBACK_REPO`` (and a write ``HF_TOKEN`` secret).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import CommitScheduler

from .store import FeedbackStore


class FeedbackScheduler(CommitScheduler):
    """A CommitScheduler whose every push starts with a fresh export of the store."""

    def __init__(self, store: FeedbackStore, *, license: str = "CC-BY-4.0", **kwargs) -> None:
        self.store = store
        self.license = license
        super().__init__(**kwargs)

    def push_to_hub(self):
        self.store.export_manifest(self.folder_path, license=self.license)
        return super().push_to_hub()


def start_feedback_sync(store: FeedbackStore, repo_id: str, *, every_minutes: float = 10.0,
                        token: str | None = None, license: str = "CC-BY-4.0", private: bool = True
                        ) -> FeedbackScheduler:
    """Start syncing ``store`` to the dataset repo ``repo_id`` (created private if missing)."""
    folder = Path(store.root) / "hub-sync"
    folder.mkdir(parents=True, exist_ok=True)
    return FeedbackScheduler(store, license=license, repo_id=repo_id, repo_type="dataset", folder_path=folder,
                             path_in_repo="feedback", every=every_minutes, token=token, private=private)

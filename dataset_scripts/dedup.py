"""Find exact and near duplicates, group them into clusters, and apply the merge policy.

Pair search is brute force over 256-bit hashes (numpy XOR + popcount): for ~10k images and 22
variants each that is ~2.5e9 word comparisons, ~15 s on one core, and it cannot miss a pair the way
an approximate index can. Clusters are connected components (union-find), so a chain of copies
(original -> resized -> re-encoded) is one cluster.

Policy (see :func:`resolve_clusters`):
1. the official test split is untouched: every test image stays in test;
2. anything in a cluster with a test image leaves train/validation ("copy of a test image");
3. a cluster whose members disagree on the label is dropped whole and listed;
4. otherwise the cluster keeps one image: the official source (Kermany) first, then the source given
   first on the command line, then the largest image, then the path (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fingerprint import Fingerprint
from .sources import Record

DEFAULT_NEAR_THRESHOLD = 28  # bits of 256: midway between the farthest re-published copy (14) and
# the closest pair of different Kermany patients (38) measured on the shared sources; see the card


def hex_to_words(hexes: list[str]) -> np.ndarray:
    """256-bit hex strings -> (n, 4) uint64."""
    return np.array([[int(h[i:i + 16], 16) for i in range(0, len(h), 16)] for h in hexes], dtype=np.uint64)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) Hamming distances between rows of two (., words) uint64 arrays."""
    d = np.zeros((len(a), len(b)), dtype=np.int32)
    for k in range(a.shape[1]):
        d += np.bitwise_count(a[:, None, k] ^ b[None, :, k]).astype(np.int32)
    return d


def near_pairs(fps: list[Fingerprint], threshold: int, block: int = 2048) -> dict[tuple[int, int], int]:
    """``{(i, j): distance}`` for i < j whose phash, or any variant of one against the other's phash,
    are within ``threshold`` bits."""
    n = len(fps)
    if n == 0:
        return {}
    base = hex_to_words([f.phash for f in fps])
    nvar = len(fps[0].variants)
    queries = np.concatenate([base, hex_to_words([v for f in fps for v in f.variants])])
    owner = np.concatenate([np.arange(n), np.repeat(np.arange(n), nvar)])
    pairs: dict[tuple[int, int], int] = {}
    for start in range(0, len(queries), block):
        d = hamming_matrix(queries[start:start + block], base)
        qi, ri = np.nonzero(d <= threshold)
        for q, r in zip(qi, ri):
            i, j = int(owner[start + q]), int(r)
            if i == j:
                continue
            key = (min(i, j), max(i, j))
            dist = int(d[q, r])
            if dist < pairs.get(key, 1 << 30):
                pairs[key] = dist
    return pairs


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def duplicate_clusters(fps: list[Fingerprint], threshold: int,
                       pairs: dict[tuple[int, int], int] | None = None) -> tuple[list[list[int]], dict, int]:
    """Clusters (lists of indices, size >= 1) from exact pixel hashes and near-duplicate pairs.
    ``pairs`` may be a precomputed :func:`near_pairs` result at a threshold >= ``threshold``.
    Returns (clusters, near pairs within threshold, number of exact-duplicate links)."""
    uf = UnionFind(len(fps))
    first_by_pixels: dict[str, int] = {}
    exact_links = 0
    for i, f in enumerate(fps):
        j = first_by_pixels.setdefault(f.pixel_sha256, i)
        if j != i:
            uf.union(i, j)
            exact_links += 1
    pairs = {k: d for k, d in (pairs if pairs is not None else near_pairs(fps, threshold)).items()
             if d <= threshold}
    for i, j in pairs:
        uf.union(i, j)
    clusters = sorted(uf.groups().values(), key=lambda c: c[0])
    return clusters, pairs, exact_links


@dataclass
class Decision:
    keep: bool
    reason: str = ""  # why dropped
    duplicate_of: str = ""  # "source:source_path" of the image that stands for it


def record_ref(r: Record) -> str:
    """How reports name an image: ``source:path-in-source``."""
    return f"{r.source}:{r.source_path}"


def resolve_clusters(records: list[Record], fps: list[Fingerprint], clusters: list[list[int]],
                     source_order: list[str]) -> tuple[list[Decision], list[dict]]:
    """Apply the merge policy. Returns one :class:`Decision` per record and the list of clusters
    dropped for label conflicts (for the report)."""
    decisions = [Decision(keep=True) for _ in records]
    conflicts = []
    rank = {s: i for i, s in enumerate(source_order)}

    def preference(i: int):
        r, f = records[i], fps[i]
        return (r.source_kind != "kermany", rank.get(r.source, len(rank)), -(f.width * f.height), r.source_path)

    for members in clusters:
        if len(members) == 1:
            continue
        tests = [i for i in members if records[i].is_official_test]
        labels = {records[i].label for i in members}
        if tests:
            rep = record_ref(records[min(tests, key=preference)])
            for i in members:
                if not records[i].is_official_test:
                    decisions[i] = Decision(False, "copy of an official test image", rep)
            if len(labels) > 1:
                conflicts.append(_conflict(records, members, "includes an official test image: test kept, rest dropped"))
            continue
        if len(labels) > 1:
            conflicts.append(_conflict(records, members, "dropped"))
            for i in members:
                decisions[i] = Decision(False, "label conflict between copies")
            continue
        best = min(members, key=preference)
        for i in members:
            if i != best:
                decisions[i] = Decision(False, "duplicate", record_ref(records[best]))
    return decisions, conflicts


def _conflict(records: list[Record], members: list[int], action: str) -> dict:
    return {
        "action": action,
        "members": [{"image": record_ref(records[i]), "label": records[i].label} for i in members],
    }

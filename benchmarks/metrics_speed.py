"""How long the metric module takes with its patient-grouped bootstrap (a measurement, not a test).

    python benchmarks/metrics_speed.py      # 624 rows (the official test's size), 1,000 resamples

Writes ``benchmarks/results/metrics_speed.json``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from modeling.metrics import compute_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 624)
    p = rng.dirichlet(np.ones(3), 624)
    p[np.arange(624), y] += 1.0
    p /= p.sum(1, keepdims=True)
    groups = [f"p{i // 2}" for i in range(624)]
    compute_metrics(p, y, groups, n_bootstrap=10)  # imports and first-call costs
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        compute_metrics(p, y, groups, n_bootstrap=1000)
        times.append(time.perf_counter() - t0)
    out = {"rows": 624, "resamples": 1000, "seconds_median": round(float(np.median(times)), 3),
           "seconds_all": [round(t, 3) for t in times], "cpu": platform.processor() or platform.machine()}
    path = ROOT / "benchmarks" / "results" / "metrics_speed.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

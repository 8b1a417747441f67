"""`make bench`'s cost curves cannot rot: ``python -m bench.curves --smoke`` (tiny tables, a
2,000-message backlog, about a second per measurement) runs here and must produce every figure
of the four curves, the JSON and the plot. Not a test of speed: nothing is asserted about how
fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def test_bench_curves_smoke(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR")}
    image = tmp_path / "cost-curves.png"
    done = subprocess.run(
        [sys.executable, "-m", "bench.curves", "--smoke", "--out", str(tmp_path), "--plot", str(image)],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (
        f"bench.curves failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    [path] = tmp_path.glob("curves-*-smoke.json")
    data = json.loads(path.read_text())
    r = data["results"]
    assert data["smoke"] is True

    assert [p["rows"] for p in r["rows"]] == [1_000, 10_000]
    for point in r["rows"]:
        miss = point["get_miss"]
        assert miss["rps"] > 0 and miss["p99_ms"] >= miss["p50_ms"] > 0, point
        assert miss["misses"] > 0 and miss["non_2xx"] <= 0.1 * miss["requests"], point
        assert point["lookup"]["buffers_mean"] > 0, point
        rehydrate = point["rehydrate"]
        assert rehydrate["loaded"] + rehydrate["skipped"] == point["rows"] and rehydrate["rate"] > 0, point

    assert [p["bytes"] for p in r["values"]] == [100, 10_000, 100_000, 1_000_000]
    for point in r["values"]:
        for kind in ("get_hit", "post"):
            figure = point[kind]
            assert figure["rps"] > 0 and figure["p99_ms"] >= figure["p50_ms"] > 0, (kind, point)
            assert figure["non_2xx"] <= 0.1 * figure["requests"], (kind, point)

    backlog = r["backlog"]
    assert backlog["drained"] and backlog["messages"] == 2_000 and backlog["rows_in_postgresql"] == 2_000, backlog
    assert backlog["drain_seconds"] > 0 and backlog["worker_peak_rss_mb"] > 0, backlog
    for window in ("post_before", "post_during", "post_after"):
        assert backlog[window]["requests"] > 0 and backlog[window]["non_2xx"] == 0, backlog

    purge = r["purge"]
    assert purge["deleted"] == purge["expired"] == 5_000 and purge["expired_left"] == 0, purge
    for window in ("get_hit_before", "get_miss_before"):
        assert purge[window]["requests"] > 0 and purge[window]["non_2xx"] == 0, purge
    assert set(data["verdicts"]) == {"rows", "values", "backlog", "purge"}

    for heading in ("**Rows in cache_entries**", "**Value size**", "**Backlog drain**", "**Purge of expired rows**"):
        assert heading in done.stdout
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000

"""The leaderboard as a person sees it: served on localhost, loaded in headless Chromium (Debian's
package, driven by Selenium), table and chart read back from the page, and a screenshot saved.

Skipped, with the reason, where Chromium, chromedriver or Selenium is missing. Set
``KVBENCH_SCREENSHOT_DIR`` to keep the screenshot somewhere other than pytest's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvbench.leaderboard_app import screenshot  # noqa: E402
from test_leaderboard import METHODS, expected_board, write_synthetic  # noqa: E402

REASON = screenshot.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser test: {REASON}")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_leaderboard_in_chromium(tmp_path):
    results = write_synthetic(tmp_path / "results")
    expected = expected_board(results)
    (results / "broken.parquet").write_bytes(b"not parquet")
    shot = tmp_path / "leaderboard.png"

    with screenshot.serve(results) as url, screenshot.browser() as driver:
        state = screenshot.wait_for_leaderboard(driver, url, timeout=60)
        screenshot.full_page_screenshot(driver, shot)

    assert state["title"] == "kvbench leaderboard"
    # the table: a header row, then one row per (method, ratio) with the numbers pandas computes
    header, *rows = state["rows"]
    assert header[:4] == ["method", "ratio", "memory saved", "score"]  # memory: the primary cost axis
    assert len(rows) == len(expected) == 10
    assert rows[0][0] == "full"
    seen = {}
    for row in rows:
        cells = dict(zip(header, row))
        seen[(cells["method"], float(cells["ratio"]))] = float(cells["score"])
    assert set(seen) == set(expected.index)
    for key, score in seen.items():
        assert score == pytest.approx(expected.loc[key, "score"], abs=1e-9), key
    # the default chart (score against memory saved): one line per method, the full baseline dashed
    legend = state["charts"][0]["legend"]
    assert legend == [*sorted(METHODS), "full (baseline)"]
    traces = {t["name"]: t for t in state["charts"][0]["traces"]}
    assert traces["full (baseline)"]["dash"] == "dash"
    assert all(traces[m]["points"] == 3 and traces[m]["dash"] == "solid" for m in METHODS), traces
    # the broken file is listed, the rest rendered
    assert any("broken.parquet" in alert for alert in state["alerts"])

    width, height = png_size(shot)
    assert width >= 1200 and height >= 1200  # the whole page, not only the first screen
    keep = os.environ.get("KVBENCH_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "leaderboard-test.png")

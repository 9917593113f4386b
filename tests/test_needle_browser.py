"""The needle map as a person sees it, in headless Chromium: the HTML report opened from disk and the
leaderboard served by Streamlit, each heatmap's cells, axes and title read back from the page and
checked against scores worked out by hand from the rows (tests/test_needle.py). Skipped, with the
reason, where Chromium, chromedriver or Selenium is missing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kvbench.cli import main  # noqa: E402
from kvbench.leaderboard_app import screenshot  # noqa: E402
from test_needle import CELLS, LENGTHS, expected_cell, write_needle_results  # noqa: E402

REASON = screenshot.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser test: {REASON}")

# Every Plotly chart titled "Needle…" (Streamlit's theme wraps titles in <b>): its title, axis labels,
# cells (NaN as null) and whether plotly drew its image.
HEATMAPS = """
const title = plot => ((plot._fullLayout && plot._fullLayout.title && plot._fullLayout.title.text) || '')
    .replace(/<[^>]+>/g, '');
return [...document.querySelectorAll('.js-plotly-plot')].filter(plot => title(plot).startsWith('Needle')).map(plot => {
    const t = plot._fullData[0];
    return {title: title(plot), type: t.type, x: [...t.x], y: [...t.y],
            z: [...t.z].map(row => Array.from(row, v => Number.isFinite(v) ? v : null)),
            drawn: plot.querySelectorAll('.heatmaplayer image, .hm image').length};
});
"""


def wait_for_heatmaps(driver, count: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    maps = driver.execute_script(HEATMAPS)
    while not (len(maps) == count and all(m["drawn"] for m in maps)):
        assert time.monotonic() < deadline, f"{count} needle heatmaps did not render: {maps}"
        time.sleep(0.25)
        maps = driver.execute_script(HEATMAPS)
    return maps


def check(shown: dict, variant: str, ratio: float | None) -> None:
    label = "threshold" if ratio is None else f"{ratio:g}"
    assert shown["title"] == f"Needle in a haystack: {variant} @ {label}"
    assert shown["type"] == "heatmap" and shown["x"] == ["1024", "2048"] and shown["y"] == ["0%", "50%", "100%"]
    got = np.array([[np.nan if v is None else v for v in row] for row in shown["z"]], dtype=float)
    want = np.array([[expected_cell(variant, ratio, n, d) for n in LENGTHS] for d in (0, 50, 100)])
    np.testing.assert_array_equal(got, want)


def test_html_report_draws_one_needle_map_per_method_and_ratio(tmp_path):
    results = write_needle_results(tmp_path / "results")
    page = tmp_path / "report.html"
    assert main(["report", str(results), "--format", "html", "--out", str(page)]) == 0
    with screenshot.browser() as driver:
        driver.get(page.as_uri())
        maps = wait_for_heatmaps(driver, len(CELLS))
    order = [("full", 0.0), ("kvzap", None), ("snapkv", 0.5), ("snapkv", 0.75)]  # full first, then by name
    assert sorted(CELLS, key=order.index) == order
    for shown, (variant, ratio) in zip(maps, order):
        check(shown, variant, ratio)


def test_leaderboard_draws_the_needle_map(tmp_path):
    results = write_needle_results(tmp_path / "results")
    with screenshot.serve(results) as url, screenshot.browser() as driver:
        screenshot.wait_for_leaderboard(driver, url, timeout=90)
        (shown,) = wait_for_heatmaps(driver, 1)
        screenshot.full_page_screenshot(driver, tmp_path / "needle.png")
    check(shown, "kvzap", None)  # the first evicting method, at its only ratio
    assert (tmp_path / "needle.png").stat().st_size > 10_000

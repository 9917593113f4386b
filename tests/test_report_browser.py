"""`kvbench report --format html` as a person sees it: the committed results' report opened from
disk in headless Chromium (no server, no network), its table read back from the page and its
Plotly charts drawn. Skipped, with the reason, where Chromium, chromedriver or Selenium is missing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kvbench.cli import main  # noqa: E402
from kvbench.leaderboard_app import screenshot  # noqa: E402
from test_report import COMMITTED, independent_board  # noqa: E402

REASON = screenshot.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser test: {REASON}")

PAGE_STATE = """
const table = document.querySelector('table.leaderboard');
const rows = table ? [...table.querySelectorAll('tr')].map(
    tr => [...tr.querySelectorAll('th, td')].map(c => c.textContent.trim())) : [];
const charts = [...document.querySelectorAll('.js-plotly-plot')].map(plot => ({
    title: (plot._fullLayout && plot._fullLayout.title) ? plot._fullLayout.title.text : null,
    xaxis: (plot._fullLayout && plot._fullLayout.xaxis) ? plot._fullLayout.xaxis.title.text : null,
    traces: (plot._fullData || []).map(t => ({name: t.name, x: [...(t.x || [])]})),
    drawn: plot.querySelectorAll('.scatterlayer .trace').length,
}));
return {rows, charts, plotly: typeof Plotly !== 'undefined', title: document.title};
"""


def test_html_report_shows_the_table_and_the_plots(tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", str(COMMITTED), "--format", "html", "--out", str(page)]) == 0
    text = page.read_text()
    assert "<script src" not in text  # plotly.js inlined: the page opens offline

    with screenshot.browser() as driver:
        driver.get(page.as_uri())
        deadline = time.monotonic() + 60
        state = driver.execute_script(PAGE_STATE)
        while not (len(state["charts"]) == 2 and all(c["drawn"] for c in state["charts"])):
            assert time.monotonic() < deadline, f"the report did not render: {state}"
            time.sleep(0.25)
            state = driver.execute_script(PAGE_STATE)
        shot = tmp_path / "report.png"
        screenshot.full_page_screenshot(driver, shot)

    assert state["plotly"] and state["title"] == "kvbench report"
    header, *rows = state["rows"]
    assert header[:4] == ["method", "ratio", "memory saved", "score [95% CI] n"]
    expected = independent_board(COMMITTED)
    assert len(rows) == len(expected) == 30 and rows[0][0] == "full"  # full + 7 x 4 ratios + kvzap's threshold
    for cells in rows:
        key = (cells[0], -1.0 if cells[1] == "threshold" else float(cells[1]))
        assert float(cells[3].split(" [")[0]) == pytest.approx(expected.loc[key, "score"], abs=0.05), key
        assert cells[3].endswith(f"n={expected.loc[key, 'samples']}")

    memory, ratio = state["charts"]
    assert memory["xaxis"].startswith("memory saved") and "entries evicted" in ratio["title"]
    names = [t["name"] for t in memory["traces"]]
    methods = sorted(set(expected.index.get_level_values("method")) - {"full"})
    assert names == [*methods, "full (baseline)"]
    kvdirect = next(t for t in memory["traces"] if t["name"] == "kvdirect")
    assert all(x < 0 for x in kvdirect["x"])  # holds more bytes than the full cache: left of zero
    assert sorted(kvdirect["x"]) == pytest.approx(sorted(expected.loc["kvdirect", "memory_saving"]), abs=1e-9)
    assert shot.stat().st_size > 10_000

"""Serve the leaderboard on localhost and look at it in headless Chromium (Debian's, driven by Selenium).

    python -m leaderboard_app.screenshot results/ docs/leaderboard.png

The browser test uses the same helpers. Nothing is downloaded: the browser is ``/usr/bin/chromium``
(or ``chromium`` on the PATH) and the driver ``chromedriver`` from the ``chromium-driver`` package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

APP = Path(__file__).resolve().parent / "app.py"
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def chromedriver_binary() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None)


def unavailable() -> str | None:
    """Why a browser run cannot happen here, or None when it can."""
    if chromium_binary() is None:
        return "Chromium is not installed (apt-get install -y chromium chromium-driver)"
    if chromedriver_binary() is None:
        return "chromedriver is not installed (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(results: Path, port: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Run ``streamlit run app.py`` on 127.0.0.1 until the block ends; yields the page's URL."""
    port = port or free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
         "--", "--results", str(Path(results).resolve())],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f}s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def browser(width: int = 1600, height: int = 1000):
    """A headless Chromium driven by Selenium, with a fresh profile; closed at the end of the block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="kvbench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_binary()
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver_binary()))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# What the page shows once it has rendered: the grid's rows (glide-data-grid keeps an accessible copy
# of its canvas in the DOM, visible columns only) and each Plotly chart's legend and traces.
_PAGE_STATE = """
const rows = [...document.querySelectorAll('[data-testid="stDataFrame"]')].slice(0, 1).flatMap(
    grid => [...grid.querySelectorAll('[role="row"]')].map(
        row => [...row.querySelectorAll('[role="gridcell"], [role="columnheader"]')].map(c => c.textContent.trim())));
const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot')].map(plot => ({
    legend: [...plot.querySelectorAll('.legendtext')].map(e => e.textContent),
    traces: (plot._fullData || []).map(t => ({name: t.name, dash: (t.line || {}).dash || null, points: t._length})),
}));
const running = document.querySelector('[data-testid="stStatusWidget"]') !== null;
const alerts = [...document.querySelectorAll('[data-testid="stAlert"]')].map(e => e.textContent);
return {rows, charts, running, alerts, title: document.title};
"""


def wait_for_leaderboard(driver, url: str, timeout: float = 60.0) -> dict:
    """Load ``url`` and wait until the table and the score chart have rendered; returns what they show."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = driver.execute_script(_PAGE_STATE)
        if len(state["rows"]) > 1 and state["charts"] and state["charts"][0]["legend"] and not state["running"]:
            time.sleep(1.0)  # let the remaining charts finish drawing
            return driver.execute_script(_PAGE_STATE)
        time.sleep(0.25)
    raise TimeoutError(f"the leaderboard did not render within {timeout:.0f}s; last state: {state}")


def full_page_screenshot(driver, path: Path, width: int = 1600) -> Path:
    """Grow the window to the page's height (Streamlit scrolls inside its main block) and capture it."""
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=\"stMain\"]') || document.body;"
        "return Math.max(m.scrollHeight, document.body.scrollHeight);"
    )
    driver.set_window_size(width, min(int(height) + 40, 12000))
    time.sleep(1.5)  # re-layout, charts resize to the new viewport
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leaderboard_app.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results folder")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1600)
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"screenshot: {reason}", file=sys.stderr)
        return 2
    with serve(args.results) as url, browser(args.width) as driver:
        state = wait_for_leaderboard(driver, url)
        full_page_screenshot(driver, args.out, args.width)
    print(f"wrote {args.out} ({len(state['charts'])} charts, legend: {', '.join(state['charts'][0]['legend'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

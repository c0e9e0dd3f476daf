"""Model references: a local checkpoint folder, or a HuggingFace hub id `org/name[@revision]` resolved through
the HuggingFace cache.

An existing local folder always wins over a hub id of the same spelling. A hub id is fetched with
`huggingface_hub.snapshot_download`, limited to config, weight, processor and code files; `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE` are read at each call (not when huggingface_hub was imported), so an
offline run resolves the id from the cache alone.

Resolving is the first step of loading a model, so its failures are the loader's ModelLoadError, defined here
(`vitparity.loading` imports this module, never the other way round).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


HUB_ID = re.compile(r"(?P<repo_id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
HUB_FILES = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "*.py",
)
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded exactly; the message names the folder and the cause."""


@dataclass(frozen=True)
class ModelRef:
    """Where a checkpoint folder came from: `spec` as given, the folder used, and for hub ids the repo and commit."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as requested (None: the default branch)
    commit: str | None = None  # the snapshot actually used

    def provenance(self) -> dict[str, str | None]:
        """What a features folder or golden records about the checkpoint's origin."""
        return {"spec": self.spec, "path": str(self.path), "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit}


def hub_id(spec: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` is spelled as a hub id and is not an existing local path."""
    if not isinstance(spec, str) or Path(spec).expanduser().exists():
        return None
    match = HUB_ID.fullmatch(spec)
    return (match["repo_id"], match["revision"]) if match else None


def hub_cache_dir() -> Path:
    """The hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def resolve_model(spec: str | os.PathLike[str]) -> ModelRef:
    """The checkpoint folder of a local path or a hub id; ModelLoadError when a hub id cannot be resolved.

    A local path is returned as it is (a missing one is reported by whoever reads it).
    """
    parsed = hub_id(spec)
    if parsed is None:
        return ModelRef(str(spec), Path(spec).expanduser())
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        folder = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=list(HUB_FILES),
            local_files_only=offline,
        ))
    except Exception as err:  # huggingface_hub raises many types: offline cache miss, unknown repo or revision, HTTP
        where = f"the cache {hub_cache_dir()} (HF_HUB_OFFLINE=1)" if offline else f"the hub or the cache {hub_cache_dir()}"
        raise ModelLoadError(
            f"{spec}: not a local folder, and hub repository {repo_id} at revision {revision or 'main'} "
            f"could not be resolved from {where} ({type(err).__name__}: {err})"
        ) from err
    return ModelRef(str(spec), folder, repo_id, revision, folder.name)


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint folder, with clear errors for a missing folder, file or bad JSON."""
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"{folder}: model path does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model path is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json in the model folder")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_path}: not valid JSON ({err})") from err

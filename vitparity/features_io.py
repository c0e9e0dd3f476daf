"""Reading and writing a features folder: features_hf.npz, features_packing.npz and metadata.json.

Writes are atomic per folder: every file is first written to a temporary file in the same folder and only
moved into place (os.replace) once all of them were written, so a failure leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

HF_FILE = "features_hf.npz"
PACKING_FILE = "features_packing.npz"
METADATA_FILE = "metadata.json"


class FeaturesError(ValueError):
    """A features folder whose content cannot be used; the message names the file and the cause."""


def _save_npz(arrays: dict[str, np.ndarray]) -> Callable[[IO[bytes]], None]:
    """A writer storing `arrays` as float32 in an uncompressed npz."""
    return lambda handle: np.savez(handle, **{key: np.asarray(value, dtype=np.float32) for key, value in arrays.items()})


def _save_json(data: dict[str, Any]) -> Callable[[IO[bytes]], None]:
    """A writer storing `data` as indented UTF-8 JSON."""
    return lambda handle: handle.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))


def write_features(
    output_dir: str | os.PathLike[str],
    hf: dict[str, np.ndarray],
    packing: dict[str, np.ndarray],
    metadata: dict[str, Any],
) -> None:
    """Write both feature sets (as float32) and the metadata into `output_dir`, creating it if needed.

    Both feature dicts must have the same keys. Existing files of the same names are replaced only once
    all three new files are complete.
    """
    if set(hf) != set(packing):
        raise ValueError(f"feature keys differ: hf {sorted(hf)} vs packing {sorted(packing)}")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {HF_FILE: _save_npz(hf), PACKING_FILE: _save_npz(packing), METADATA_FILE: _save_json(metadata)}
    written: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, temp = temporary_file(folder, name)
            written[name] = temp
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        for name, temp in written.items():
            os.replace(temp, folder / name)
    finally:
        for temp in written.values():
            if os.path.exists(temp):
                os.unlink(temp)


def temporary_file(folder: Path, name: str) -> tuple[int, str]:
    """A hidden temporary file beside `folder / name` (to be renamed over it), with the permissions a plain
    `open()` would give (mkstemp's are 0600 whatever the umask)."""
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, temp


def _existing_file(folder: Path, name: str) -> Path:
    """folder / name, or FileNotFoundError naming it."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found in the features folder")
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz file, read eagerly; FeaturesError for anything unreadable or non-numeric."""
    arrays: dict[str, np.ndarray] | None = None
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise FeaturesError(f"{path}: not a readable npz file ({type(err).__name__}: {err})") from err
    if arrays is None:
        raise FeaturesError(f"{path}: not an npz archive (it holds a single array)")
    for key, array in arrays.items():
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise FeaturesError(f"{path}: array {key!r} is not numeric (dtype {array.dtype})")
    return arrays


def read_features(
    features_dir: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(hf features, packing features, metadata) of a features folder.

    A missing folder or file raises FileNotFoundError; an unreadable npz, a non-numeric array or invalid
    metadata raises FeaturesError. When metadata.json lists its inputs, both files must hold exactly those
    keys (FeaturesError naming the files and keys otherwise); without that list, keys present on one side
    only are returned as they are: callers report them.
    """
    folder = Path(features_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: features folder not found")
    hf = _read_npz(_existing_file(folder, HF_FILE))
    packing = _read_npz(_existing_file(folder, PACKING_FILE))
    metadata_path = _existing_file(folder, METADATA_FILE)
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FeaturesError(f"{metadata_path}: not valid JSON ({err})") from err
    if not isinstance(metadata, dict):
        raise FeaturesError(f"{metadata_path}: expected a JSON object, got {type(metadata).__name__}")
    if "inputs" in metadata:
        _check_listed_inputs(folder, metadata["inputs"], {HF_FILE: hf, PACKING_FILE: packing})
    return hf, packing, metadata


def _check_listed_inputs(folder: Path, listed: Any, files: dict[str, dict[str, np.ndarray]]) -> None:
    """FeaturesError unless every feature file holds exactly the inputs metadata.json lists."""
    if not isinstance(listed, dict):
        raise FeaturesError(f"{folder / METADATA_FILE}: 'inputs' must be an object, got {type(listed).__name__}")
    problems = []
    for name, arrays in files.items():
        missing = [key for key in listed if key not in arrays]
        unlisted = [key for key in arrays if key not in listed]
        if missing:
            problems.append(f"{folder / name} lacks {', '.join(missing)}")
        if unlisted:
            problems.append(f"{folder / name} has {', '.join(unlisted)}, not listed")
    if problems:
        raise FeaturesError(f"{folder / METADATA_FILE}: its inputs do not match the features: " + "; ".join(problems))


def seed_features_map(hf: dict[str, np.ndarray], packing: dict[str, np.ndarray]) -> dict[str, dict[str, list[int]]]:
    """The seed tools' top-level `features` entry of metadata.json: side -> input -> feature shape."""
    return {"hf": {key: list(value.shape) for key, value in hf.items()},
            "packing": {key: list(value.shape) for key, value in packing.items()}}


def describe_metadata(metadata: dict[str, Any]) -> list[str]:
    """The `Metadata` and `Inputs` blocks `verify` prints before its comparisons (the seed tools' screen layout),
    then one line per config difference recorded as a warning. Missing entries print as `?`."""
    lines = [
        "Metadata",
        f"  HF model: {metadata.get('hf_model_path', '?')}",
        f"  Packing model: {metadata.get('packing_model_path', '?')}",
        f"  Device: {metadata.get('device', '?')}",
        f"  Num frames: {metadata.get('num_frames', '?')}",
    ]
    inputs = metadata.get("inputs")
    if isinstance(inputs, dict) and inputs:
        lines.append("Inputs")
        for key, item in inputs.items():
            item = item if isinstance(item, dict) else {}
            seen, native = input_resolution(item)
            lines += [f"  {key}: {item.get('path', '?')}",
                      f"    Resolution: {seen}" + (f" (native {native})" if native != seen else "")]
            if "sampled_frames" in item or "total_frames" in item:
                sampled, total = item.get("sampled_frames", "?"), item.get("total_frames", "?")
                repeat = isinstance(sampled, int) and isinstance(total, int) and sampled > total
                lines.append(f"    Frames: {sampled}/{total}" + (f" (the clip has {total} frames: sampled frames "
                                                                   "repeat)" if repeat else ""))
    models = metadata.get("models")
    if isinstance(models, dict):
        for side in ("hf", "packing"):
            code = models.get(side).get("code") if isinstance(models.get(side), dict) else None
            if isinstance(code, dict):
                lines.append(f"Code of the {side} model: {code_line(code)}")
    lines += [f"WARNING: config difference (not a field that defines the weights): {warning}"
              for warning in metadata.get("config_warnings") or ()]
    restored = metadata.get("restored_buffers")
    if isinstance(restored, dict):
        lines += [f"NOTE: {side} model: restored buffers: {', '.join(names)} (left wrong by loading; restored from "
                  "a fresh construction of its class)" for side, names in restored.items() if names]
    return lines


def code_line(code: dict[str, Any]) -> str:
    """One line for a recorded code choice (`checkpoint_code.CodeRecord.to_dict`): source, class, files' digests."""
    files = ", ".join(f"{name} {str(digest)[:8]}" for name, digest in (code.get("files") or {}).items())
    text = f"{code.get('source', '?')} {code.get('class', '?')} [{files}]"
    if code.get("source") == "vitparity" and code.get("auto_map"):
        text += f" (NOT the checkpoint's own code {code['auto_map']}: --own-classes set it aside)"
    if code.get("flash_attn"):
        text += f" (flash-attn: {code['flash_attn']})"
    return text


def input_resolution(item: dict[str, Any]) -> tuple[str, str]:
    """(size the model saw, native size) of one input of metadata.json, each as `WxH` (`?` when unknown).

    Reads the three layouts: `orig_width` present (the release tool's, and vitparity's since it writes that key):
    `width` is the size seen; vitparity's older files (`aligned_width`, no `orig_width`): `width` is the native
    size; neither: `width` is the size seen and the native size is unknown.
    """
    def size(w: str, h: str) -> str:
        return f"{item.get(w, '?')}x{item.get(h, '?')}"

    if "orig_width" in item:
        return size("width", "height"), size("orig_width", "orig_height")
    if "aligned_width" in item:
        return size("aligned_width", "aligned_height"), size("width", "height")
    return size("width", "height"), "?x?"

"""Which code runs a checkpoint, chosen by one rule and recorded with the digests of its files.

A checkpoint whose config.json names code of its own (`auto_map`) is gated with that code: it runs only with
`--trust-remote-code`; `--own-classes` instead checks the same weights with vitparity's own classes (chosen by
`model_type`), and says so. Neither flag: a usage error naming the `auto_map` entry and both ways on. vitparity never
substitutes its classes for a checkpoint's code silently.

The checkpoint's code is imported here (`import_checkpoint_class`) for both the preflight check and the load, so a
file that is missing, empty, not valid Python, or without the class named is one error naming the file and the
class. While it is imported on a machine where flash-attn cannot be imported, `flash_attn_standin` serves its
`flash_attn_varlen_func` / `flash_attn_func`; the record says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.dynamic_module_utils import get_class_from_dynamic_module, get_relative_imports
from transformers.utils import logging as hf_logging

from .features_io import code_line
from .flash_attn_standin import DESCRIPTION as STANDIN_DESCRIPTION
from .flash_attn_standin import StandInUnsupported, standin_installed, uses_standin
from .hub import ModelLoadError, ModelRef

TRUST_FLAG = "--trust-remote-code"
OWN_CLASSES_FLAG = "--own-classes"
CHECKPOINT_CODE = "checkpoint code"
OWN_CODE = "vitparity"


@dataclass(frozen=True)
class CodeRecord:
    """The code that runs one checkpoint: where it comes from, its model class and the sha256 of each file."""

    source: str  # CHECKPOINT_CODE (auto_map, with --trust-remote-code) or OWN_CODE (vitparity's classes)
    class_name: str  # "modeling_x.ModelClass" (the auto_map entry) or "vitparity.models.<module>.<Class>"
    files: dict[str, str]  # file name (relative to the checkpoint folder, or to the vitparity package) -> sha256
    auto_map: str | None = None  # the checkpoint's auto_map AutoModel entry (also when --own-classes set it aside)
    flash_attn: str | None = None  # checkpoint code only: what served its flash-attn imports, None when none
    model_class: type | None = field(default=None, compare=False, repr=False)  # the class to load with

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "class": self.class_name, "auto_map": self.auto_map,
                "files": dict(self.files), "flash_attn": self.flash_attn}

    def headline(self) -> str:
        """Short: `the checkpoint's own code modeling_x.Model` / `vitparity's own classes (OneVisionEncoderModel)`."""
        if self.source == CHECKPOINT_CODE:
            standin = " with the flash-attn stand-in" if self.flash_attn and "stand-in" in self.flash_attn else ""
            return f"the checkpoint's own code {self.class_name}{standin}"
        aside = f", its own code {self.auto_map} NOT run ({OWN_CLASSES_FLAG})" if self.auto_map else ""
        return f"vitparity's own classes ({self.class_name.rsplit('.', 1)[-1]}{aside})"

    def describe(self) -> str:
        """One line: `checkpoint code modeling_x.Model [modeling_x.py 1a2b3c4d, ...] (flash-attn: ...)`."""
        return code_line(self.to_dict())


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def auto_model_entry(config: dict, where: Path | str) -> str | None:
    """The `auto_map` AutoModel entry of a config.json dict (None when the checkpoint names no code of its own)."""
    if "auto_map" not in config:
        return None
    auto_map = config["auto_map"]
    entry = auto_map.get("AutoModel") if isinstance(auto_map, dict) else None
    if not isinstance(entry, str) or "." not in entry:
        raise ModelLoadError(f"{where}: config.json auto_map has no AutoModel entry of the form module.Class "
                             f"(auto_map: {auto_map!r})")
    return entry


def _module_file(folder: Path, entry: str) -> tuple[Path, str]:
    """(the file of an auto_map entry `[repo--]module.Class` inside `folder`, the class name)."""
    module, class_name = entry.split("--")[-1].rsplit(".", 1)
    return folder / f"{module.replace('.', '/')}.py", class_name


def _check_source(path: Path, entry: str, class_name: str) -> None:
    """The checks that need no import: the file exists, is not empty, parses, and defines `class_name` somewhere."""
    what = f"the checkpoint's code for {entry} (class {class_name})"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing; it holds {what}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ModelLoadError(f"{path}: empty; it should hold {what}")
    try:
        compile(text, str(path), "exec")
    except SyntaxError as err:
        raise ModelLoadError(f"{path}:{err.lineno}: not valid Python ({err.msg}); it holds {what}") from None


def relative_import_files(path: Path, entry: str, class_name: str) -> list[Path]:
    """`path` and every file it imports relatively (recursively); ModelLoadError names a missing one and its
    importer."""
    found, queue = [path], [path]
    while queue:
        importer = queue.pop()
        for module in get_relative_imports(str(importer)):
            file = path.parent / f"{module}.py"
            if not file.is_file():
                raise ModelLoadError(f"{file}: missing; {importer.name} imports it (class {class_name}, auto_map "
                                     f"{entry})")
            if file not in found:
                found.append(file)
                queue.append(file)
    return found


def code_files(folder: Path, entries: list[str]) -> dict[str, str]:
    """File name -> sha256 of each code file the entries name, with the files they import relatively."""
    files: dict[str, str] = {}
    for entry in entries:
        path, class_name = _module_file(folder, entry)
        if path.is_file():
            for file in relative_import_files(path, entry, class_name):
                files.setdefault(file.relative_to(folder).as_posix(), file_digest(file))
    return dict(sorted(files.items()))


def import_checkpoint_class(folder: Path, entry: str) -> tuple[type, str | None]:
    """The checkpoint's own class named by `entry` (its auto_map AutoModel), and what served its flash-attn imports
    (None when it bound none).

    The code is imported as it is; only when that fails for want of flash-attn (and the real package cannot be
    imported) is it imported again with `flash_attn_standin` installed, so code that imports flash-attn optionally
    keeps its own fallback. Resolved directly: `AutoModel` prefers a class registered for the config (this package registers every
    model_type it knows), so it would silently run the project's code instead of the checkpoint's. ModelLoadError
    names the file and the class when the code cannot be imported.
    """
    path, class_name = _module_file(folder, entry)
    _check_source(path, entry, class_name)
    for file in relative_import_files(path, entry, class_name)[1:]:
        _check_source(file, entry, class_name)
    try:
        try:
            with _quiet_transformers():  # its requirement check logs each missing package before raising
                cls, installed = get_class_from_dynamic_module(entry, str(folder)), False
        except ImportError as err:
            if not _needs_flash_attn(err):
                raise
            with standin_installed() as installed:  # False when the real package imports: the error stands
                cls = get_class_from_dynamic_module(entry, str(folder))
    except StandInUnsupported as err:
        raise ModelLoadError(f"{path}: class {class_name}: {err}") from None
    except AttributeError as err:
        raise ModelLoadError(f"{path}: no class {class_name} in the checkpoint's code ({err})") from None
    except Exception as err:  # failed import, missing requirement, error raised by the module's own code
        raise ModelLoadError(f"{path}: cannot import the checkpoint's code for class {class_name} "
                             f"({type(err).__name__}: {err})") from None
    if not inspect.isclass(cls):
        raise ModelLoadError(f"{path}: {class_name} is not a class")
    package = cls.__module__.rsplit(".", 1)[0]
    modules = [module for name, module in list(sys.modules.items()) if name.startswith(package + ".") and module]
    if installed and any(uses_standin(module) for module in modules):
        return cls, f"stand-in {STANDIN_DESCRIPTION}"
    real = sys.modules.get("flash_attn") if not installed else None
    if real is not None and any(value is real or str(getattr(value, "__module__", None) or "").startswith("flash_attn")
                                for module in modules for value in vars(module).values()):
        return cls, f"flash_attn {getattr(real, '__version__', '?')} (the installed package)"
    return cls, None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _needs_flash_attn(err: ImportError) -> bool:
    """Whether an import failed for want of flash-attn: transformers' requirement check, the import itself, or the
    code's own check (`if not is_flash_attn_2_available(): raise ImportError("FlashAttention 2 is required ...")`)."""
    text = str(err).lower()
    return (str(getattr(err, "name", "") or "").startswith("flash_attn")
            or any(word in text for word in ("flash_attn", "flash-attn", "flashattention", "flash attention")))


def own_code_files(cls: type) -> dict[str, str]:
    """File name -> sha256 of the files of the package that defines one of vitparity's model classes."""
    package_dir = Path(inspect.getfile(cls)).parent
    root = package_dir.parent.parent
    return {path.relative_to(root).as_posix(): file_digest(path) for path in sorted(package_dir.glob("*.py"))}


def refusal(ref: ModelRef, side: str | None, entry: str) -> str:
    """The usage error for a checkpoint that ships code of its own, run with neither flag."""
    which = f"the {side} checkpoint" if side else "the checkpoint"
    return (f"{ref.spec}: {which} ships its own code (config.json auto_map AutoModel: {entry}); "
            f"vitparity does not put its own classes in its place silently. Pass {TRUST_FLAG} to gate the "
            f"checkpoint's own code (the release's), or {OWN_CLASSES_FLAG} to check these weights with vitparity's "
            "own classes instead")


def choose_code(ref: ModelRef, side: str | None, config: dict, *, trust_remote_code: bool, own_classes: bool,
                known_types: dict) -> CodeRecord:
    """The code rule for one checkpoint (see the module docstring); imports the checkpoint's code when it is to run.

    `known_types`: model_type -> (config class, model class, side) of vitparity's own classes.
    ModelLoadError names the checkpoint, the auto_map entry or file, and the ways on.
    """
    if trust_remote_code and own_classes:
        raise ModelLoadError(f"{TRUST_FLAG} and {OWN_CLASSES_FLAG} exclude each other: run the checkpoint's own code "
                             "or vitparity's classes, not both")
    folder = ref.path
    entry = auto_model_entry(config, folder / "config.json")
    model_type = config.get("model_type")
    if entry is not None and trust_remote_code:
        cls, flash_attn = import_checkpoint_class(folder, entry)
        entries = [entry]
        config_entry = config["auto_map"].get("AutoConfig")
        if isinstance(config_entry, str) and "." in config_entry:
            entries.append(config_entry)
        return CodeRecord(CHECKPOINT_CODE, entry.split("--")[-1], code_files(folder, entries), entry, flash_attn,
                          cls)
    if entry is not None and not own_classes:
        raise ModelLoadError(refusal(ref, side, entry))
    if model_type not in known_types:
        hint = (f"; {OWN_CLASSES_FLAG} needs one of them, {TRUST_FLAG} runs the checkpoint's code ({entry})"
                if entry else "")
        raise ModelLoadError(f"{folder}: unknown model_type {model_type!r}; vitparity's classes know "
                             f"{sorted(known_types)}{hint}")
    cls = known_types[model_type][1]
    return CodeRecord(OWN_CODE, f"{cls.__module__}.{cls.__qualname__}", own_code_files(cls), entry, None, cls)

"""The suite's options: one table, read from the command line, the environment and the ini file, validated once.

Every option is a flag (`--num-frames`), an environment variable (`VITPARITY_NUM_FRAMES`) and an ini key
(`vitparity_num_frames`); the command line wins over the environment, which wins over the ini. A bad value is a
usage error that names the option as the user spelled it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..builtin import BUILTIN_MEDIA, builtin_paths
from ..compare import DEFAULT_THRESHOLD
from ..loading import DTYPES, resolve_device_dtype
from ..media import ALIGN_POLICIES, check_scale, scale_suffix
from ..models.packed_attention import BACKENDS, SDPA_KERNELS, available_backends, available_sdpa_kernels
from .cases import Shard, parse_shard

DETERMINISM_POLICIES = ("auto", "all", "off")
# Tokens per pack group when --pack-tokens is not given. On a GPU: a ViT-L packed forward of 131k bf16 tokens
# that keeps no hidden states needs a few GiB; on the CPU, groups stay small enough to run in seconds.
DEFAULT_PACK_TOKENS = {"cpu": 16_384, "cuda": 131_072}


@dataclass(frozen=True)
class Option:
    name: str
    group: str
    help: str
    default: str | None = None
    flag: bool = False

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "VITPARITY_" + self.name.upper()

    @property
    def ini(self) -> str:
        return f"vitparity_{self.name}"


OPTIONS = (
    Option("hf_model", "models", "non-packing checkpoint folder (default: the built-in tiny model)"),
    Option("packing_model", "models", "packing checkpoint folder (default: the built-in tiny packing model)"),
    Option("trust_remote_code", "models", "allow a checkpoint's own code (auto_map) to run", flag=True),
    Option("device", "models", "cpu, cuda, cuda:N or auto (cuda when available)", "auto"),
    Option("dtype", "models", "float32, bfloat16, float16 or auto (bfloat16 on cuda, float32 on cpu)", "auto"),
    Option("require_device", "models", "fail instead of skip when the requested CUDA device is absent", flag=True),
    Option("media", "cases", "extra folder of images and videos: each file becomes a case"),
    Option("num_frames", "cases", "frames sampled per video", "8"),
    Option("align", "cases", f"patch alignment of sizes that are not a multiple of the patch size: {ALIGN_POLICIES}",
           "crop"),
    Option("threshold", "checks", "min per-token cosine (strictly greater) for packing vs non-packing parity",
           str(DEFAULT_THRESHOLD)),
    Option("determinism", "checks", "second forward of each model to check determinism: auto (every case on the "
           "CPU; on a GPU the largest image and video of each worker), all, off", "auto"),
    Option("pack_tokens", "work", "token budget of a pack group (default: 16384 on the CPU, 131072 on CUDA)"),
    Option("shard", "work", "run shard K of N (K/N): whole pack groups, disjoint, together the full run"),
    Option("golden_dir", "goldens", "root folder of golden snapshots", "fixtures/golden"),
    Option("regenerate_goldens", "goldens", "rewrite every selected golden (implies --snapshot-update)", flag=True),
    Option("report_dir", "report", "folder for heat maps of failing cases", "parity-report"),
    Option("scales", "cases", "comma-separated fractions of the native size, each a case of every image and video "
           "(1 = native; e.g. 1,0.5)", "1"),
    Option("packed_backend", "models", f"packed attention backend of the packing model: {BACKENDS}", "auto"),
    Option("attention_kernel", "models", f"SDPA kernel tried first by both models: {SDPA_KERNELS}", "auto"),
)
GROUP_TITLES = {
    "models": "the two models", "cases": "cases", "checks": "checks", "work": "work split",
    "goldens": "golden snapshots", "report": "report",
}
TRUE = {"1", "true", "yes", "on"}


def add_options(parser: pytest.Parser) -> None:
    """Register every option (grouped in --help) and its ini key."""
    for key, title in GROUP_TITLES.items():
        group = parser.getgroup(f"vitparity {key}", f"vitparity: {title} (write paths as --option=PATH)")
        for option in (o for o in OPTIONS if o.group == key):
            default = f"; default {option.default}" if option.default else ""
            text = f"{option.help} [env {option.env}; ini {option.ini}{default}]"
            if option.flag:
                group.addoption(option.cli, action="store_const", const=True, default=None, dest=option.ini, help=text)
                parser.addini(option.ini, option.help, type="bool", default=None)
            else:
                group.addoption(option.cli, default=None, dest=option.ini, metavar=option.name.upper(), help=text)
                parser.addini(option.ini, option.help, default=None)


@dataclass(frozen=True)
class RawValue:
    """An option's value and where it came from (named in error messages; relative paths resolve by it)."""

    value: str | bool | None
    source: str  # "cli", "env", "ini" or "default"
    label: str  # how the user spelled it: --num-frames, VITPARITY_NUM_FRAMES, ini vitparity_num_frames


def _raw(config: pytest.Config, option: Option) -> RawValue:
    value = config.getoption(option.ini)
    if value is not None:
        return RawValue(value, "cli", option.cli)
    value = os.environ.get(option.env)
    if value is not None:
        return RawValue(value.strip().lower() in TRUE if option.flag else value, "env", option.env)
    value = config.getini(option.ini)
    if value is not None and value != "":
        return RawValue(bool(value) if option.flag else value, "ini", f"ini {option.ini}")
    return RawValue(bool(option.default) if option.flag else option.default, "default", option.cli)


@dataclass(frozen=True)
class Settings:
    hf_model: Path
    packing_model: Path
    trust_remote_code: bool
    device: str
    dtype: str
    require_device: bool
    media_dirs: tuple[Path, ...]
    num_frames: int
    align: str
    threshold: float
    determinism: str
    pack_tokens: int
    shard: Shard | None
    golden_dir: Path
    regenerate_goldens: bool
    report_dir: Path
    scales: tuple[float, ...] = (1.0,)
    packed_backend: str = "auto"
    attention_kernel: str = "auto"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]


def _resolve_path(config: pytest.Config, raw: RawValue) -> Path:
    """A path option: relative paths from the command line or environment resolve against the current
    folder, those from the ini file or the defaults against the ini file's folder (the repository root)."""
    path = Path(str(raw.value)).expanduser()
    if path.is_absolute():
        return path
    if raw.source in ("cli", "env"):
        return Path(config.invocation_params.dir) / path
    return (config.inipath.parent if config.inipath else config.rootpath) / path


def resolve_settings(config: pytest.Config) -> Settings:
    """Read and validate every option once; errors name the option as it was given (flag, variable or ini key)."""
    raw = {option.name: _raw(config, option) for option in OPTIONS}

    def bad(name: str, problem: str) -> pytest.UsageError:
        return pytest.UsageError(f"{raw[name].label}={raw[name].value}: {problem}")

    def path(name: str) -> Path | None:
        return _resolve_path(config, raw[name]) if raw[name].value else None

    def whole(name: str, minimum: int, text: str | None = None) -> int:
        try:
            value = int(str(raw[name].value if text is None else text).strip())
        except ValueError:
            raise bad(name, "not a whole number") from None
        if value < minimum:
            raise bad(name, f"must be >= {minimum}")
        return value

    try:
        device, dtype = resolve_device_dtype(raw["device"].value, raw["dtype"].value)
    except ValueError as err:
        raise pytest.UsageError(f"{raw['device'].label} / {raw['dtype'].label}: {err}") from err
    if raw["align"].value not in ALIGN_POLICIES:
        raise bad("align", f"use one of {ALIGN_POLICIES}")
    if raw["determinism"].value not in DETERMINISM_POLICIES:
        raise bad("determinism", f"use one of {DETERMINISM_POLICIES}")
    try:
        threshold = float(raw["threshold"].value)
    except ValueError:
        raise bad("threshold", "not a number") from None
    if not 0.0 < threshold < 1.0:
        raise bad("threshold", "must be in (0, 1)")
    if raw["pack_tokens"].value:
        pack_tokens = whole("pack_tokens", 1)
    else:
        pack_tokens = DEFAULT_PACK_TOKENS["cuda" if device.startswith("cuda") else "cpu"]
    shard = None
    if raw["shard"].value:
        try:
            shard = parse_shard(str(raw["shard"].value))
        except ValueError as err:
            raise bad("shard", str(err)) from None
    hf_model, packing_model = path("hf_model"), path("packing_model")
    if hf_model is None or packing_model is None:
        default_hf, default_packing = builtin_paths()
        hf_model, packing_model = hf_model or default_hf, packing_model or default_packing
    return Settings(
        hf_model=hf_model,
        packing_model=packing_model,
        trust_remote_code=raw["trust_remote_code"].value,
        device=device,
        dtype=dtype,
        require_device=raw["require_device"].value,
        media_dirs=(BUILTIN_MEDIA, path("media")) if raw["media"].value else (BUILTIN_MEDIA,),
        num_frames=whole("num_frames", 1),
        align=raw["align"].value,
        threshold=threshold,
        determinism=raw["determinism"].value,
        pack_tokens=pack_tokens,
        shard=shard,
        golden_dir=path("golden_dir"),
        regenerate_goldens=raw["regenerate_goldens"].value,
        report_dir=path("report_dir"),
        scales=_scales(str(raw["scales"].value), bad),
        packed_backend=_choice(raw["packed_backend"].value, BACKENDS, available_backends(device, DTYPES[dtype]), bad,
                               "packed_backend", f"on {device} in {dtype}"),
        attention_kernel=_choice(raw["attention_kernel"].value, SDPA_KERNELS,
                                 available_sdpa_kernels(device, DTYPES[dtype]), bad, "attention_kernel",
                                 f"on {device} in {dtype}"),
    )


def _scales(text: str, bad) -> tuple[float, ...]:
    """`1,0.5` -> (1.0, 0.5): each a fraction in (0, 1] with a short name, none twice."""
    scales: list[float] = []
    for part in text.split(","):
        try:
            scale = check_scale(part.strip())
            scale_suffix(scale)
        except ValueError as err:
            raise bad("scales", f"{part.strip()!r}: {err}") from None
        if scale in scales:
            raise bad("scales", f"{part.strip()!r} is listed twice")
        scales.append(scale)
    return tuple(scales)


def _choice(value: str, known: tuple[str, ...], available: tuple[str, ...], bad, name: str, where: str) -> str:
    """One of `known`; anything but "auto" must also be in `available` (what runs on this device and dtype)."""
    if value not in known:
        raise bad(name, f"use one of {known}")
    if value != "auto" and value not in available:
        raise bad(name, f"not available {where}; available here: {', '.join(('auto', *available))}")
    return value


def option_label(config: pytest.Config, name: str) -> str:
    """How the user gave option `name` (flag, variable or ini key), for messages about its value."""
    return _raw(config, next(o for o in OPTIONS if o.name == name)).label

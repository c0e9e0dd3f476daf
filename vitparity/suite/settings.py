"""The suite's settings: every option's value validated once, with errors that name the option as it was given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..builtin import BUILTIN_GOLDEN, BUILTIN_MEDIA, builtin_paths
from ..hub import hub_id
from ..loading import DTYPES, resolve_device_dtype
from ..media import ALIGN_POLICIES, check_scale, scale_suffix
from ..models.packed_attention import BACKENDS, SDPA_KERNELS, available_backends, available_sdpa_kernels
from ..pair import PairError, check_threshold
from .cases import Shard, parse_shard
from .options import OPTIONS, PLAN_POLICIES, RawValue, raw_value

# Tokens per pack group when --pack-tokens is not given. On a GPU: a ViT-L packed forward of 131k bf16 tokens
# that keeps no hidden states needs a few GiB; on the CPU, groups stay small enough to run in seconds.
DEFAULT_PACK_TOKENS = {"cpu": 16_384, "cuda": 131_072}


@dataclass(frozen=True)
class Settings:
    hf_model: Path | str  # a folder, or a hub id kept as given
    packing_model: Path | str
    trust_remote_code: bool
    strict_config: bool
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
    # How the user gave each option (flag, variable or ini key), for messages about its value; default: the flag.
    labels: dict[str, str] = field(default_factory=lambda: {option.name: option.cli for option in OPTIONS})
    strict_buffers: bool = False
    golden_baseline: Path | None = None  # a previous release's golden folder (vitparity.suite.baseline)
    baseline_min_cos: float | None = None  # None: the baseline drift is only reported
    companions: str = "auto"

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
    raw = {option.name: raw_value(config, option) for option in OPTIONS}

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
    for name in ("determinism", "companions"):
        if raw[name].value not in PLAN_POLICIES:
            raise bad(name, f"use one of {PLAN_POLICIES}")
    try:
        threshold = check_threshold(float(raw["threshold"].value), raw["threshold"].label)
    except ValueError:
        raise bad("threshold", "not a number") from None
    except PairError as err:
        raise pytest.UsageError(str(err)) from None
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
    def model(name: str) -> Path | str | None:
        """A checkpoint folder, or a hub id (org/name[@revision]) when no local path of that name exists."""
        value, folder = raw[name].value, path(name)
        return value if folder is not None and not folder.exists() and hub_id(str(value)) else folder

    hf_model, packing_model = model("hf_model"), model("packing_model")
    if hf_model is None or packing_model is None:
        default_hf, default_packing = builtin_paths()
        hf_model, packing_model = hf_model or default_hf, packing_model or default_packing
    return Settings(
        hf_model=hf_model,
        packing_model=packing_model,
        trust_remote_code=raw["trust_remote_code"].value,
        strict_config=raw["strict_model_config"].value,
        device=device,
        dtype=dtype,
        require_device=raw["require_device"].value,
        media_dirs=(BUILTIN_MEDIA, path("media")) if raw["media"].value else (BUILTIN_MEDIA,),
        num_frames=whole("num_frames", 1),
        align=raw["align"].value,
        threshold=threshold,
        determinism=raw["determinism"].value,
        companions=raw["companions"].value,
        pack_tokens=pack_tokens,
        shard=shard,
        golden_dir=_golden_dir(config, raw["golden_dir"], raw["regenerate_goldens"].value),
        regenerate_goldens=raw["regenerate_goldens"].value,
        report_dir=path("report_dir"),
        scales=_scales(str(raw["scales"].value), bad),
        packed_backend=_choice(raw["packed_backend"].value, BACKENDS, lambda: available_backends(device, DTYPES[dtype]),
                               bad, "packed_backend", f"on {device} in {dtype}"),
        attention_kernel=_choice(raw["attention_kernel"].value, SDPA_KERNELS,
                                 lambda: available_sdpa_kernels(device, DTYPES[dtype]), bad, "attention_kernel",
                                 f"on {device} in {dtype}"),
        labels={name: value.label for name, value in raw.items()},
        strict_buffers=raw["strict_buffers"].value,
        golden_baseline=path("golden_baseline"),
        baseline_min_cos=_baseline_min_cos(raw, bad),
    )


def _golden_dir(config: pytest.Config, raw: RawValue, regenerate: bool) -> Path:
    """--golden-dir. Its default, fixtures/golden beside the ini file, is the built-in models' goldens (package data)
    where pytest found no ini file: `vitparity gate` in a folder of its own. Those are never rewritten: an update
    without an ini file needs --golden-dir (UsageError)."""
    if raw.source != "default" or config.inipath is not None:
        return _resolve_path(config, raw)
    if regenerate or config.getoption("update_snapshots", False):
        raise pytest.UsageError(f"{raw.label}: no ini file here, and the built-in goldens ({BUILTIN_GOLDEN}) are "
                                "package data: name the folder to write goldens to with --golden-dir=FOLDER")
    return BUILTIN_GOLDEN


def _baseline_min_cos(raw: dict[str, RawValue], bad) -> float | None:
    """--baseline-min-cos: a cosine in [-1, 1), only with --golden-baseline."""
    value = raw["baseline_min_cos"].value
    if value is None:
        return None
    if not raw["golden_baseline"].value:
        raise bad("baseline_min_cos", "needs --golden-baseline (the folder to measure against)")
    try:
        number = float(value)
    except ValueError:
        raise bad("baseline_min_cos", "not a number") from None
    if not -1.0 <= number < 1.0:
        raise bad("baseline_min_cos", "a cosine limit must be in [-1, 1)")
    return number


def _scales(text: str, bad) -> tuple[float, ...]:
    """`1,0.5` -> (1.0, 0.5): each a fraction in (0, 1] with a short name, none twice."""
    scales: list[float] = []
    for part in text.split(","):
        try:
            scale = check_scale(part.strip())
            scale_suffix(scale)  # a fraction that needs more than 6 decimals has no short name
        except ValueError as err:
            raise bad("scales", f"{part.strip()!r}: {err}") from None
        if scale in scales:
            raise bad("scales", f"{part.strip()!r} is listed twice")
        scales.append(scale)
    return tuple(scales)


def _choice(value: str, known: tuple[str, ...], available: Callable[[], tuple[str, ...]], bad, name: str,
            where: str) -> str:
    """One of `known`; anything but "auto" must also be in `available()` (what runs on this device and dtype, only
    probed for a named choice)."""
    if value not in known:
        raise bad(name, f"use one of {known}")
    if value != "auto" and value not in available():
        raise bad(name, f"not available {where}; available here: {', '.join(('auto', *available()))}")
    return value



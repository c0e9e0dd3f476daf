"""The suite's settings: every option's value validated once, with errors that name the option as it was given.

Light to import: the values the arguments and the filesystem decide are checked first, so a usage error is said
before torch loads; torch is imported to resolve device auto, and the cases' module for --shard."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..builtin import BUILTIN_GOLDEN, BUILTIN_MEDIA, builtin_paths
from ..choices import ALIGN_POLICIES, TEMPORAL_CONTEXT
from ..hub import hub_id
from ..media import check_scale, scale_suffix
from ..precision import AUTO, Bars
from ..rules import PairError, check_threshold, resolve_device_dtype
from .options import OPTIONS, PLAN_POLICIES, RawValue, raw_value

if TYPE_CHECKING:
    from .cases import Shard

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
    # How the user gave each option (flag, variable or ini key), for messages about its value; default: the flag.
    labels: dict[str, str] = field(default_factory=lambda: {option.name: option.cli for option in OPTIONS})
    strict_buffers: bool = False
    golden_baseline: tuple[Path, ...] = ()  # a previous release's golden folders or root (vitparity.suite.baseline)
    baseline_min_cos: float | None = None  # None: the baseline drift is only reported
    companions: str = "auto"
    require_representative: bool = False  # media too small for the card fail (vitparity.suite.representative)
    codec_frames: int = 0  # budget of each video's codec-style case in frames' worth of tokens; 0: no codec cases
    own_classes: bool = False  # --own-classes: vitparity's classes on a checkpoint that ships its own code
    outputs: str = "auto"  # cases whose last_hidden_state / pooler_output (and reference) are compared
    reference: bool = True  # False: --no-reference

    @property
    def torch_dtype(self):
        from ..loading import DTYPES

        return DTYPES[self.dtype]

    @property
    def bars(self) -> Bars:
        """The precision bars of packing vs non-packing comparisons: the run's dtype's (docs/detection.md)."""
        return Bars.for_dtype(self.dtype, AUTO, AUTO)

    @property
    def probe_bars(self) -> Bars:
        """The bars of the float32 probe: float32's."""
        return Bars.for_dtype("float32", AUTO, AUTO)

    @property
    def probes(self) -> bool:
        """Whether the run has a float32 probe: every 16-bit run."""
        return self.dtype != "float32"


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

    def whole(name: str, minimum: int) -> int:
        try:
            value = int(str(raw[name].value).strip())
        except ValueError:
            raise bad(name, "not a whole number") from None
        if value < minimum:
            raise bad(name, f"must be >= {minimum}")
        return value

    if raw["align"].value not in ALIGN_POLICIES:
        raise bad("align", f"use one of {ALIGN_POLICIES}")
    for name in ("determinism", "companions", "outputs"):
        if raw[name].value not in PLAN_POLICIES:
            raise bad(name, f"use one of {PLAN_POLICIES}")
    try:
        threshold = check_threshold(float(raw["threshold"].value), raw["threshold"].label)
    except ValueError:
        raise bad("threshold", "not a number") from None
    except PairError as err:
        raise pytest.UsageError(str(err)) from None
    pack_tokens = whole("pack_tokens", 1) if raw["pack_tokens"].value else None

    def model(name: str) -> Path | str | None:
        """A checkpoint folder, or a hub id (org/name[@revision]) when no local path of that name exists."""
        value, folder = raw[name].value, path(name)
        return value if folder is not None and not folder.exists() and hub_id(str(value)) else folder

    if raw["trust_remote_code"].value and raw["own_classes"].value:
        raise pytest.UsageError(f"{raw['trust_remote_code'].label} and {raw['own_classes'].label} exclude each other: "
                                "run the checkpoints' own code or vitparity's classes, not both")
    # Up to here, and in these five, the arguments and the filesystem decide: a usage error is said before torch loads.
    media_dirs, num_frames = _media(config, raw, bad), whole("num_frames", 1)
    golden_dir = _golden_dir(config, raw["golden_dir"], raw["regenerate_goldens"].value)
    scales = _scales(str(raw["scales"].value), bad)
    golden_baseline = _paths(config, raw["golden_baseline"], bad, "golden_baseline")
    baseline_min_cos = _baseline_min_cos(raw, bad)
    codec_frames = min(num_frames, TEMPORAL_CONTEXT)  # a codec-style case of every video, --num-frames' budget
    try:  # the device rule: a requested device that is absent is a usage error, never a skip
        device, dtype = resolve_device_dtype(raw["device"].value, raw["dtype"].value, raw["device"].label,
                                             raw["dtype"].label)
    except ValueError as err:
        raise pytest.UsageError(str(err)) from err
    shard = None
    if raw["shard"].value:
        from .cases import parse_shard

        try:
            shard = parse_shard(str(raw["shard"].value))
        except ValueError as err:
            raise bad("shard", str(err)) from None
    hf_model, packing_model = model("hf_model"), model("packing_model")
    if hf_model is None or packing_model is None:
        default_hf, default_packing = builtin_paths()
        hf_model, packing_model = hf_model or default_hf, packing_model or default_packing
    return Settings(
        hf_model=hf_model,
        packing_model=packing_model,
        trust_remote_code=raw["trust_remote_code"].value,
        own_classes=raw["own_classes"].value,
        outputs=raw["outputs"].value,
        reference=not raw["no_reference"].value,
        strict_config=raw["strict_model_config"].value,
        device=device,
        dtype=dtype,
        media_dirs=media_dirs,
        num_frames=num_frames,
        align=raw["align"].value,
        threshold=threshold,
        determinism=raw["determinism"].value,
        companions=raw["companions"].value,
        pack_tokens=pack_tokens or DEFAULT_PACK_TOKENS["cuda" if device.startswith("cuda") else "cpu"],
        shard=shard,
        golden_dir=golden_dir,
        regenerate_goldens=raw["regenerate_goldens"].value,
        report_dir=path("report_dir"),
        scales=scales,
        labels={name: value.label for name, value in raw.items()},
        strict_buffers=raw["strict_buffers"].value,
        golden_baseline=golden_baseline,
        baseline_min_cos=baseline_min_cos,
        require_representative=raw["require_representative"].value,
        codec_frames=codec_frames,
    )


def _paths(config: pytest.Config, raw: RawValue, bad, name: str) -> tuple[Path, ...]:
    """A path option that takes several paths separated by os.pathsep, each resolved like every path option
    (absolute); none empty, none twice, the flag not repeated (pytest would keep the last). () when not given."""
    flag = "--" + name.replace("_", "-")
    given = sum(str(arg) == flag or str(arg).startswith(flag + "=") for arg in config.invocation_params.args)
    if given > 1:
        raise pytest.UsageError(f"{flag} is given {given} times and the last would replace the others: list the "
                                f"paths in one {flag}, separated by {os.pathsep!r}")
    paths: list[Path] = []
    for part in str(raw.value).split(os.pathsep) if raw.value else []:
        if not part.strip():
            raise bad(name, f"an empty path (paths are separated by {os.pathsep!r})")
        path = _resolve_path(config, RawValue(part.strip(), raw.source, raw.label))
        if path.resolve() in (known.resolve() for known in paths):
            raise bad(name, f"{part.strip()} is listed twice")
        paths.append(path)
    return tuple(paths)


def _media(config: pytest.Config, raw: dict[str, RawValue], bad) -> tuple[Path, ...]:
    """The bundled media folder (unless --no-bundled-media), then each path of --media (folders and single files,
    separated by os.pathsep), resolved like every path option; none empty, none twice."""
    own = _paths(config, raw["media"], bad, "media")
    if not raw["no_bundled_media"].value:
        return (BUILTIN_MEDIA, *(path for path in own if path.resolve() != BUILTIN_MEDIA.resolve()))
    if not own:
        raise pytest.UsageError(f"{raw['no_bundled_media'].label}: needs --media (the files to run on instead of the "
                                "bundled ones)")
    return tuple(own)


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

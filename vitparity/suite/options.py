"""The suite's options: one table, read from the command line, the environment and the ini file.

Registered by the suite's plugin (`vitparity.pytest_plugin`, whose `pytest_addoption` this is): the options exist
only in runs of the suite, never in another project's pytest. It imports nothing heavy. `suite.settings` validates the values.

Every option is a flag (`--num-frames`) and an ini key (`vitparity_num_frames`); the options CI sets
(`CI_VARIABLES`: the GPU workflow, the composite action, tox's gpu environment) are an environment variable too
(`VITPARITY_DEVICE`). The command line wins over the environment, which wins over the ini. A bad value is a usage
error that names the option as the user spelled it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from ..choices import ALIGN_POLICIES, DEFAULT_THRESHOLD

# The options CI sets through the environment (.github/workflows/gpu-parity.yml, action.yml, tox.ini's gpu
# environment; docs/options.md lists them): the only ones that are an environment variable too.
CI_VARIABLES = frozenset({
    "hf_model", "packing_model", "media", "no_bundled_media", "device", "dtype", "shard", "golden_dir",
    "golden_baseline", "report_dir", "require_representative",
})
# --determinism and --companions: one policy set, resolved by one rule (`cases.resolve_policy`)
PLAN_POLICIES = ("auto", "all", "sample", "off")


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
    def env(self) -> str | None:
        """Its environment variable, for the options CI sets only (`CI_VARIABLES`)."""
        return "VITPARITY_" + self.name.upper() if self.name in CI_VARIABLES else None

    @property
    def ini(self) -> str:
        return f"vitparity_{self.name}"


OPTIONS = (
    Option("hf_model", "models", "non-packing checkpoint folder or hub id org/name[@revision] "
           "(default: the built-in tiny model)"),
    Option("packing_model", "models", "packing checkpoint folder or hub id (default: the built-in tiny packing model)"),
    Option("trust_remote_code", "models", "gate a checkpoint's own code (auto_map): the release's modeling files",
           flag=True),
    Option("own_classes", "models", "check a checkpoint that ships its own code (auto_map) with vitparity's own "
           "classes instead (said in the summary); without this or --trust-remote-code such a checkpoint is refused",
           flag=True),
    # pytest owns --strict-config (its own ini checks), hence the longer name.
    Option("strict_model_config", "models", "any difference of the two models' configs fails (default: only fields "
           "that define the weights; others are reported and feature parity decides)", flag=True),
    Option("strict_buffers", "models", "a model whose non-persistent buffers loading left different from a fresh "
           "construction of its class fails (default: they are restored and named in the summary and goldens)",
           flag=True),
    Option("device", "models", "cpu, cuda, cuda:N or auto (cuda when available); a requested device that is "
           "absent is a usage error", "auto"),
    Option("dtype", "models", "float32, bfloat16, float16 or auto (bfloat16 on cuda, float32 on cpu)", "auto"),
    Option("media", "cases", "media of one's own, added to the bundled files: folders (every image and video "
           "in each) and single files, several separated by os.pathsep (':' on Linux and macOS)"),
    Option("no_bundled_media", "cases", "leave the bundled media (fixtures/media) out: only --media's files are "
           "cases", flag=True),
    Option("num_frames", "cases", "frames sampled per video", "8"),
    Option("align", "cases", f"patch alignment of sizes that are not a multiple of the patch size: {ALIGN_POLICIES}",
           "crop"),
    Option("threshold", "checks", "min per-token cosine (strictly greater) for packing vs non-packing parity",
           str(DEFAULT_THRESHOLD)),
    Option("determinism", "checks", "second forward of each model to check determinism: auto (all on the CPU, "
           "sample on a GPU), all (every case), sample (the largest image and video of each pack group), off", "auto"),
    Option("companions", "checks", "bit-exact companion swaps: auto (all on the CPU, sample on a GPU), all (every "
           "pack group, both halves; packing features from forwards alone), sample (one two-case probe per pack "
           "group; then the group's packing features come from its pack), off", "auto"),
    Option("outputs", "checks", "compare last_hidden_state and pooler_output too (and, when checkpoint code runs, "
           "each model with vitparity's own classes as a reference): auto (all on the CPU, sample on a GPU), all, "
           "sample (outputs: the largest image and video of each pack group; reference: its smallest case), off",
           "auto"),
    Option("no_reference", "checks", "do not compare the checkpoint's code with vitparity's own classes (a release "
           "that changes the architecture on purpose); recorded and shown in the summary", flag=True),
    Option("pack_tokens", "work", "token budget of a pack group (default: 16384 on the CPU, 131072 on CUDA)"),
    Option("require_representative", "work", "fail before any test when the media are too small for the card: no "
           "case of 10,000 tokens or more, or no pack group filling half of --pack-tokens (default: a warning on "
           "CUDA)", flag=True),
    Option("shard", "work", "run shard K of N (K/N): whole pack groups, disjoint, together the full run"),
    Option("golden_dir", "goldens", "root folder of golden snapshots", "fixtures/golden"),
    Option("regenerate_goldens", "goldens", "rewrite every selected golden (implies --snapshot-update)", flag=True),
    Option("golden_baseline", "goldens", "a previous release's golden root (e.g. its fixtures/golden) or golden "
           "folders (<model_type>-<fingerprint>-<dtype>-<F>of<C>-<align>, several separated by os.pathsep): report "
           "each case's drift against it, for both models"),
    Option("baseline_min_cos", "goldens", "fail a case whose min projected cosine against --golden-baseline is not "
           "above this (default: report only)"),
    Option("report_dir", "report", "folder for heat maps of failing cases", "parity-report"),
    Option("scales", "cases", "comma-separated fractions of the native size, each a case of every image and video "
           "(1 = native; e.g. 1,0.5)", "1"),
)
GROUP_TITLES = {
    "models": "the two models", "cases": "cases", "checks": "checks", "work": "work split",
    "goldens": "golden snapshots", "report": "report",
}
TRUE = {"1", "true", "yes", "on"}


VALUED = frozenset(option.cli for option in OPTIONS if not option.flag)


def join_values(args: list[str]) -> tuple[list[str], list[str]]:
    """(`args` with each suite option written `--option VALUE` rewritten `--option=VALUE`, the values that were
    separate). pytest picks its rootdir from the command's paths before any plugin adds an option, so a separate
    value that is a path would be taken for a test path."""
    out, separate, index = [], [], 0
    while index < len(args):
        if args[index] in VALUED and index + 1 < len(args) and not args[index + 1].startswith("-"):
            out.append(f"{args[index]}={args[index + 1]}")
            separate.append(args[index + 1])
            index += 2
        else:
            out.append(args[index])
            index += 1
    return out, separate


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register every option (grouped in --help) and its ini key."""
    for key, title in GROUP_TITLES.items():
        group = parser.getgroup(f"vitparity {key}", f"vitparity: {title} (write paths as --option=PATH)")
        for option in (o for o in OPTIONS if o.group == key):
            default = f"; default {option.default}" if option.default else ""
            env = f"env {option.env}; " if option.env else ""
            text = f"{option.help} [{env}ini {option.ini}{default}]"
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
    label: str  # how the user spelled it: --num-frames, VITPARITY_DEVICE, ini vitparity_num_frames


def raw_value(config: pytest.Config, option: Option) -> RawValue:
    value = config.getoption(option.ini)
    if value is not None:
        return RawValue(value, "cli", option.cli)
    value = os.environ.get(option.env) if option.env else None
    if value is not None:
        return RawValue(value.strip().lower() in TRUE if option.flag else value, "env", option.env)
    value = config.getini(option.ini)
    if value is not None and value != "":
        return RawValue(bool(value) if option.flag else value, "ini", f"ini {option.ini}")
    return RawValue(bool(option.default) if option.flag else option.default, "default", option.cli)


"""The `vitparity` command: run the gate, extract features with both models, verify a features folder, convert
weights, merge the JUnit XML of suite runs into one parity report."""

# Only light modules are imported here (argparse, numpy, the option values): --version, --help, golden-show and
# every usage error that the arguments and the filesystem decide are answered without torch or transformers, which
# each command imports where it needs them (tests/test_cli_imports.py checks the import graph).
from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .choices import ALIGN_POLICIES, DEFAULT_THRESHOLD, DTYPE_NAMES
from .compare import Comparison, compare_features
from .features_io import HF_FILE, PACKING_FILE, describe_metadata, read_features, seed_features_map, write_features
from .hub import ModelLoadError, hub_id, read_config, resolve_model
from .precision import AUTO, BAR_DTYPES, Bars, parse_bar
from .rules import check_num_frames, check_threshold, resolve_device_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .media import Media

ROOT_DEFAULTS = {"image1": "1.jpg", "image2": "2.jpg", "video1": "1.mp4", "video2": "2.mp4"}
NAMED_INPUTS = ("image1", "image2", "video1", "video2")
OUTPUT_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")


def _progress(message: str) -> None:
    """A progress line on stderr, only when stderr is a terminal."""
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


# The seed tools' spellings of options the suite names otherwise: accepted as aliases (and their dashed forms).
ALIASES = {"hf_model": ("hf_model_path",), "packing_model": ("packing_model_path",),
           "strict_model_config": ("strict_config",)}


def _flags(name: str) -> list[str]:
    """The flags of an option: its primary, dashed name first (the suite's spelling), then the underscore spelling
    and each alias of `ALIASES` in both spellings."""
    flags: list[str] = []
    for spelling in (name, *ALIASES.get(name, ())):
        for flag in (f"--{spelling.replace('_', '-')}", f"--{spelling}"):
            if flag not in flags:
                flags.append(flag)
    return flags


def _as_typed(args: argparse.Namespace, name: str) -> str:
    """The flag of option `name` as the user typed it (the last one given), else its primary name."""
    flags = _flags(name)
    typed = [arg.split("=", 1)[0] for arg in args.argv if arg.split("=", 1)[0] in flags]
    return typed[-1] if typed else flags[0]


class _PrimaryNames(argparse.HelpFormatter):
    """--help shows each option by its primary name; the aliases parse but are not listed."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1 and action.dest != "help":
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


def _option(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add option `name` under every flag of `_flags` (the dashed one shown in --help)."""
    parser.add_argument(*_flags(name), dest=name, **kwargs)


class _BarAction(argparse.Action):
    """Store a precision bar parsed by the suite's rule (`precision.parse_bar`); a bad value is a usage error (exit 2)
    naming the option as it was typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, parse_bar(values, option_string or self.option_strings[0]))
        except ValueError as err:
            parser.error(str(err))


def _bar_option(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    """`--max-cos-gap` / `--max-norm-gap`: "auto", "off" or a limit."""
    _option(parser, name, action=_BarAction, default=AUTO,
            help=f"{what}: auto (the dtype's default, docs/detection.md), off, or a number")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitparity", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vitparity {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    aliases = ("Options are spelled as the suite's (--hf-model, --num-frames); the seed tools' spellings stay "
               "aliases: --hf_model_path, --packing_model_path, --num_frames, --output_dir, --features_dir, "
               "--strict_config, ... (underscores for dashes), and --hf-model-path, --packing-model-path, "
               "--strict-config.")
    extract = commands.add_parser("extract", help="extract penultimate features with both models and verify them",
                                  description=aliases, formatter_class=_PrimaryNames)
    _option(extract, "hf_model", metavar="DIR|ORG/NAME[@REV]",
            help="non-packing checkpoint folder or hub id (default: built-in tiny model)")
    _option(extract, "packing_model", metavar="DIR|ORG/NAME[@REV]",
            help="packing checkpoint folder or hub id (default: built-in tiny model)")
    _option(extract, "root", metavar="DIR", help="default inputs <root>/1.jpg, 2.jpg, 1.mp4, 2.mp4")
    for name in NAMED_INPUTS:
        _option(extract, name, metavar="PATH")
    _option(extract, "images", metavar="PATH", nargs="+", action="extend", default=[], help="more images")
    _option(extract, "videos", metavar="PATH", nargs="+", action="extend", default=[], help="more videos")
    _option(extract, "num_frames", type=int, default=8, help="frames sampled per video (default 8)")
    _option(extract, "output_dir", metavar="DIR", default="./features", help="default ./features")
    _option(extract, "threshold", type=float, default=DEFAULT_THRESHOLD, help="minimum per-token cosine")
    _bar_option(extract, "max_cos_gap", "direction bar, the largest mean per-token (1 - cosine)")
    _bar_option(extract, "max_norm_gap", "magnitude bar, the largest per-token |norm(packing) / norm(hf) - 1|")
    _option(extract, "device", default="auto",
            help="cpu, cuda, cuda:N or auto (cuda when available); a requested device that is absent is an error")
    _option(extract, "dtype", choices=("auto", *DTYPE_NAMES), default="auto", help="auto: bfloat16 on cuda, else float32")
    _option(extract, "align", choices=ALIGN_POLICIES, default="crop", help="how sizes become multiples of the patch")
    _option(extract, "trust_remote_code", action="store_true",
            help="run a checkpoint's own code (auto_map): the release's modeling files")
    _option(extract, "own_classes", action="store_true",
            help="check a checkpoint that ships its own code (auto_map) with vitparity's own classes instead; "
                 "without this or --trust-remote-code such a checkpoint is refused")
    _option(extract, "strict_model_config", action="store_true",
            help="any config difference is an error (default: only fields that define the weights)")
    _option(extract, "strict_buffers", action="store_true",
            help="refuse a model whose non-persistent buffers loading left different from a fresh construction "
                 "(default: restore them and name them)")
    _option(extract, "codec", action="store_true",
            help="also each video's codec-style sparse case (<key>_codec, e.g. video1_codec): 64 frames, a budget of "
                 "--num-frames frames' worth of tokens, the selection in metadata.json")
    _option(extract, "trace_layers", action="store_true",
            help="compare every hidden state of every input too and store the figures in metadata.json")

    verify = commands.add_parser("verify", help="compare the features of a features folder", description=aliases,
                                 formatter_class=_PrimaryNames)
    _option(verify, "features_dir", metavar="DIR", required=True)
    _option(verify, "threshold", type=float, default=DEFAULT_THRESHOLD, help="minimum per-token cosine")
    _bar_option(verify, "max_cos_gap", "direction bar, the largest mean per-token (1 - cosine)")
    _bar_option(verify, "max_norm_gap", "magnitude bar, the largest per-token |norm(packing) / norm(hf) - 1|")

    convert = commands.add_parser("convert", help="convert a checkpoint to the other layout (HF <-> packing)")
    convert.add_argument("source", metavar="SOURCE_DIR",
                         help="checkpoint folder to convert (config.json and safetensors weights), either layout; "
                              "its model_type says which")
    convert.add_argument("output", metavar="OUT_DIR",
                         help="new or empty folder for the other layout: config.json, model.safetensors and "
                              "preprocessor_config.json (the source's, or CLIP mean / std when it has none)")

    report = commands.add_parser(
        "report-junit", help="merge the JUnit XML of suite runs (e.g. shards) into one Markdown parity report",
        description="Print the comparisons, failed tests and costs of suite runs written with --junitxml as "
                    "Markdown (e.g. >> $GITHUB_STEP_SUMMARY); exit 1 if a test failed or errored, a test ran in "
                    "two files, or no test ran.",
    )
    report.add_argument("junit_files", metavar="JUNIT_XML", nargs="+")

    golden_diff = commands.add_parser(
        "golden-diff", help="what changed between two sets of goldens (folders, or REV:PATH read with git)",
        description="Per golden: projected cosine and norm drift of NEW against OLD, token count and grid changes, "
                    "provenance changes; then the goldens only in one of them. Goldens pair by path, the weights' "
                    "fingerprint left out of the model folder's name. Example: vitparity golden-diff "
                    "HEAD~1:fixtures/golden fixtures/golden",
    )
    golden_diff.add_argument("old", metavar="OLD")
    golden_diff.add_argument("new", metavar="NEW")
    golden_diff.add_argument("--new-only", action="store_true",
                             help="count the goldens only in OLD without listing them (NEW holds what a regeneration wrote)")
    golden_show = commands.add_parser(
        "golden-show", help="one golden as text (the git textconv driver of goldens)",
        description="Provenance, shape, grid, norm statistics and array checksums of one golden .npz.",
    )
    golden_show.add_argument("file", metavar="FILE")
    commands.add_parser(
        "gate", add_help=False, help="run the parity suite as installed, from any folder; every argument passes to "
        "pytest (vitparity gate -k video -n 4 --hf-model=PATH; vitparity gate --help lists the suite's options)",
    )
    return parser


def resolve_inputs(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """key -> (kind, path) in order image1..imageK, video1..videoK.

    Named flags take their slot; --root fills the named slots not given; --images / --videos fill the
    free slots of their kind in order.
    """
    named = {name: getattr(args, name) for name in NAMED_INPUTS}
    if args.root is not None:
        for name, filename in ROOT_DEFAULTS.items():
            named[name] = named[name] or str(Path(args.root) / filename)
    inputs: dict[str, tuple[str, str]] = {}
    for kind, extra in (("image", args.images), ("video", args.videos)):
        slots = {int(name[len(kind):]): path for name, path in named.items() if name.startswith(kind) and path}
        queue = list(extra)
        index = 1
        while queue or any(slot >= index for slot in slots):
            if index in slots:
                inputs[f"{kind}{index}"] = (kind, slots[index])
            elif queue:
                inputs[f"{kind}{index}"] = (kind, queue.pop(0))
            index += 1
    if not inputs:
        raise ValueError("no inputs: give --image1/--image2/--video1/--video2, --images/--videos or --root")
    return inputs


def _check_output_dir(output_dir: str, label: str = "--output-dir") -> None:
    """Refuse an --output-dir that is, or lies under, an existing non-folder, before any work is done."""
    output = Path(output_dir)
    for folder in (output, *output.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{label} {output}: {folder} exists and is not a folder")
            return


def _check_local_models(specs: Sequence[str | None]) -> None:
    """Each model given as a local path (not a hub id) is a folder with a readable config.json; ModelLoadError
    otherwise, before torch loads (`vitparity.pair.preflight_pair` reads the same files again, with the rules)."""
    for spec in specs:
        if spec is not None and hub_id(spec) is None:
            read_config(resolve_model(spec).path)


def _load_inputs(
    inputs: dict[str, tuple[str, str]], *, num_frames: int, patch_size: int, align: str, codec_frames: int = 0
) -> tuple[dict[str, Media], dict[str, Media]]:
    """Decode every input, and with `codec_frames` each video's `codec_frames` sampled frames too (its codec-style
    case), all before any model loads (`vitparity.media_check`): key -> media, and video key -> its codec frames.
    MediaError when a file's extension is not of its slot's kind; MediaCheckError listing every file that cannot be
    decoded."""
    from .media import MediaError, media_kind
    from .media_check import MediaUse, check_media

    for key, (kind, path) in inputs.items():
        if media_kind(path) != kind:
            raise MediaError(path, f"given as {key} but its extension is that of a {media_kind(path)}")
    uses = {key: MediaUse(path, kind, num_frames if kind == "video" else 0) for key, (kind, path) in inputs.items()}
    codec = {key: MediaUse(path, kind, codec_frames) for key, (kind, path) in inputs.items()
             if codec_frames and kind == "video"}
    decoded = check_media([*uses.values(), *codec.values()], patch_size=patch_size, align=align, keep=True)
    return ({key: decoded[use] for key, use in uses.items()}, {key: decoded[use] for key, use in codec.items()})


def run_extract(args: argparse.Namespace) -> int:
    """The extract command: check the pair's config files, load inputs, then both models, extract, write the
    folder, verify it."""
    check_threshold(args.threshold, "--threshold")
    _check_output_dir(args.output_dir, _as_typed(args, "output_dir"))
    if (args.hf_model is None) != (args.packing_model is None):
        raise ValueError(f"give both {_as_typed(args, 'hf_model')} and {_as_typed(args, 'packing_model')}, or "
                         "neither for the built-in tiny models")
    inputs = resolve_inputs(args)
    _check_local_models((args.hf_model, args.packing_model))
    # The suite's device rule (an absent device is an error); device auto or cuda: the first import of torch.
    device, dtype_name = resolve_device_dtype(args.device, args.dtype, _as_typed(args, "device"),
                                              _as_typed(args, "dtype"))
    # The usage errors have been said: torch and transformers load from here on.
    from .builtin import builtin_paths
    from .codec import context_frames
    from .extract import extract_hf, extract_packing, prepare_sample
    from .loading import DTYPES, library_versions
    from .media import decoder_record
    from .numerics import pinned_float32
    from .pair import preflight_pair
    from .trace import trace_layers

    if args.hf_model is None:
        hf_path, packing_path = (str(path) for path in builtin_paths())
    else:
        hf_path, packing_path = args.hf_model, args.packing_model
    dtype = DTYPES[dtype_name]
    # Wrong model paths, swapped sides, configs that differ, too many frames or disagreeing processors fail here,
    # before any media is decoded.
    files = preflight_pair(hf_path, packing_path, strict_config=args.strict_model_config,
                           trust_remote_code=args.trust_remote_code, own_classes=args.own_classes)
    has_video = any(kind == "video" for kind, _ in inputs.values())
    check_num_frames(args.num_frames, files.temporal_context if has_video else None, hf_path,
                     _as_typed(args, "num_frames"))

    _progress(f"loading {len(inputs)} inputs ...")
    codec_frames = context_frames(files.temporal_context) if args.codec else 0
    media, codec_media = _load_inputs(inputs, num_frames=args.num_frames, patch_size=files.patch_size,
                                      align=args.align, codec_frames=codec_frames)
    pair = files.load(
        dtype=dtype, device=device, strict_config=args.strict_model_config,
        strict_buffers=args.strict_buffers,
        on_load=lambda side, ref: _progress(f"loading {'HF' if side == 'hf' else side} model {ref.spec} ..."),
    )

    context = pair.temporal_context
    samples = [
        prepare_sample(item, patch_size=pair.patch_size, dtype=dtype, device=device, temporal_context=context,
                       name=key, normalization=pair.normalization)
        for key, item in media.items()
    ]
    paths = {key: item.path for key, item in media.items()}
    if args.codec:
        samples += _codec_samples(codec_media, args, pair, dtype=dtype, device=device)
        paths.update({f"{key}_codec": item.path for key, item in codec_media.items()})
    hf_features: dict[str, np.ndarray] = {}
    with pinned_float32(device, dtype):
        for index, sample in enumerate(samples, start=1):
            _progress(f"[{index}/{len(samples)}] {sample.name} {Path(paths[sample.name]).name}: {sample.num_tokens} tokens")
            hf_features[sample.name] = extract_hf(pair.hf.model, sample, temporal_context=context).cpu().numpy()[None]
        _progress(f"packing model: {len(samples)} inputs in one pass ...")
        packed = extract_packing(pair.packing.model, samples)
    packing_features = {sample.name: part.cpu().numpy() for sample, part in zip(samples, packed)}

    provenance = pair.provenance()
    metadata = {
        "hf_model_path": hf_path,
        "packing_model_path": packing_path,
        "num_frames": args.num_frames,
        "device": device,
        "dtype": provenance["dtype"],
        "tf32": provenance["tf32"],
        "align": args.align,
        "threshold": args.threshold,
        "strict_config": args.strict_model_config,
        "strict_buffers": args.strict_buffers,
        "temporal_context": provenance["temporal_context"],
        "restored_buffers": provenance["restored_buffers"],
        "config_warnings": provenance["config_warnings"],
        "normalization": provenance["normalization"],
        "models": provenance["models"],
        "versions": library_versions(),
        "decoder": decoder_record(),
        "features": seed_features_map(hf_features, packing_features),
        "inputs": {
            sample.name: {
                **sample.metadata,
                "shape": [1, *sample.pixels.shape[:1], *sample.pixels.shape[2:]] if sample.kind == "image"
                else [1, *sample.pixels.shape],
                "hf_feature_shape": list(hf_features[sample.name].shape),
                "packing_feature_shape": list(packing_features[sample.name].shape),
            }
            for sample in samples
        },
    }
    if args.trace_layers:
        with pinned_float32(device, dtype):
            for sample in samples:
                _progress(f"tracing {sample.name} layer by layer ...")
                trace = trace_layers(
                    pair.hf.model, pair.packing.model, sample, pack=samples, threshold=args.threshold,
                    temporal_context=context, bars=Bars.for_dtype(provenance["dtype"], args.max_cos_gap,
                                                                  args.max_norm_gap),
                )
                metadata["inputs"][sample.name]["layer_trace"] = trace.to_json()
    write_features(args.output_dir, hf_features, packing_features, metadata)
    _progress(f"wrote {HF_FILE}, {PACKING_FILE} and metadata.json to {args.output_dir}")
    return verify_folder(args.output_dir, args.threshold, args.max_cos_gap, args.max_norm_gap)


def _codec_samples(codec_media: dict[str, Media], args: argparse.Namespace, pair, *, dtype: torch.dtype,
                   device: str) -> list:
    """`<key>_codec` of every video: the codec-style selection of --num-frames frames' worth of tokens
    (`vitparity.codec`) from its temporal context (64 frames, decoded with the inputs); the kept indices are added
    to its metadata."""
    from .codec import prepare_codec_sample
    from .media import MediaError

    samples = []
    for key, frames in codec_media.items():
        try:
            sample = prepare_codec_sample(frames, patch_size=pair.patch_size, budget_frames=args.num_frames,
                                          dtype=dtype, device=device, name=f"{key}_codec",
                                          normalization=pair.normalization)
        except ValueError as err:
            raise MediaError(frames.path, f"codec-style selection: {err}") from None
        sample.metadata["codec_selection"]["visible_indices"] = sample.visible_indices.tolist()
        samples.append(sample)
    return samples


def _one_sided(name: str, shape: tuple[int, ...], missing_from: str, threshold: float) -> Comparison:
    """A failed comparison for a key found in only one of the two feature files."""
    hf_shape, packing_shape = (shape, ()) if missing_from == PACKING_FILE else ((), shape)
    nan = math.nan
    return Comparison(
        name, hf_shape, packing_shape, threshold, False, f"missing from {missing_from}", nan, nan, nan, nan, nan
    )


def verify_folder(features_dir: str, threshold: float, max_cos_gap: str | float = AUTO,
                  max_norm_gap: str | float = AUTO) -> int:
    """Print the folder's Metadata and Inputs blocks and any config warning, compare every key by the threshold and
    the precision bars of the dtype the folder's metadata names (`vitparity.precision`; none for a folder that names
    no known dtype, said in the output), print the report; 0 when all pass, 1 otherwise."""
    check_threshold(threshold, "--threshold")
    hf, packing, metadata = read_features(features_dir)
    print("\n".join(describe_metadata(metadata)) + "\n")
    dtype = metadata.get("dtype")
    bars = Bars.for_dtype(dtype, max_cos_gap, max_norm_gap) if dtype in BAR_DTYPES else None
    print(f"precision {bars.describe()}" if bars else f"no precision bars: the metadata names no dtype of {BAR_DTYPES}")
    comparisons = []
    for key in [*hf, *(key for key in packing if key not in hf)]:
        if key not in packing:
            comparisons.append(_one_sided(key, hf[key].shape, PACKING_FILE, threshold))
        elif key not in hf:
            comparisons.append(_one_sided(key, packing[key].shape, HF_FILE, threshold))
        else:
            comparisons.append(compare_features(hf[key], packing[key], name=key, threshold=threshold, bars=bars))
    from .report import format_report

    title = f"{metadata.get('hf_model_path', '?')} vs {metadata.get('packing_model_path', '?')}"
    print(format_report(comparisons, title=title))
    inputs = metadata.get("inputs", {})
    for comparison in comparisons:
        recorded = inputs.get(comparison.name, {}).get("layer_trace") if isinstance(inputs, dict) else None
        if not comparison.passed and recorded is not None:
            from .trace import LayerTrace

            print("\n" + LayerTrace.from_json(recorded).format())
    if not comparisons:
        print(f"FAIL: no features in {features_dir}")
        return 1
    return 0 if all(c.passed for c in comparisons) else 1


def run_convert(args: argparse.Namespace) -> int:
    """The convert command: write the other layout of a checkpoint folder."""
    source, output = Path(args.source), Path(args.output)
    if output.resolve() == source.resolve():
        raise ValueError(f"{output}: the output folder must differ from the source checkpoint")
    existing = sorted(path.name for pattern in OUTPUT_WEIGHT_PATTERNS for path in output.glob(pattern))
    if existing:
        raise ValueError(f"{output}: the output folder already holds weights ({', '.join(existing)}); "
                         "convert into a new or empty folder")
    read_config(source)  # a missing or unreadable source said before torch loads
    from .convert import convert_checkpoint

    before = {path: path.stat().st_mtime_ns for path in output.iterdir()} if output.is_dir() else {}
    convert_checkpoint(source, output)
    model_type = read_config(output).get("model_type")
    print(f"converted {source} -> {output} ({model_type})")
    for path in sorted(output.iterdir()):
        if before.get(path) != path.stat().st_mtime_ns:
            print(f"  wrote {path}")
    return 0


def run_report_junit(paths: Sequence[str]) -> int:
    """The report-junit command: the merged Markdown report on stdout; 1 when the runs together do not pass."""
    from .junit_report import merge_report, read_junit

    text, passed = merge_report([read_junit(path) for path in paths])
    print(text, end="")
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vitparity` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gate"]:  # pytest's arguments, untouched by argparse
        from .gate import run_gate

        return run_gate(argv[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    args.argv = argv  # for `_as_typed`
    try:
        if args.command == "extract":
            return run_extract(args)
        if args.command == "verify":
            return verify_folder(args.features_dir, args.threshold, args.max_cos_gap, args.max_norm_gap)
        if args.command == "report-junit":
            return run_report_junit(args.junit_files)
        if args.command == "golden-diff":
            from .golden_diff import diff_golden_sets, format_golden_diff

            print(format_golden_diff(diff_golden_sets(args.old, args.new), args.old, args.new,
                                     new_only=args.new_only))
            return 0
        if args.command == "golden-show":
            from .golden_diff import describe_golden

            print(describe_golden(Path(args.file).read_bytes(), args.file))
            return 0
        return run_convert(args)
    # MediaError, MediaCheckError, ConversionError, FeaturesError, JUnitError, GoldenCorrupt and GoldenSourceError
    # are ValueErrors: caught here without importing their (heavy) modules.
    except (ModelLoadError, OSError, ValueError) as err:
        print(f"vitparity: error: {err}", file=sys.stderr)
        return 2

"""The suite's forward plan and shard split: how many forward tokens each plan spends over the one-pass minimum
(one pass per case and input path: the packing model and each hf call), and how evenly `--shard=K/N` spreads the tokens.

Plan efficiency: the suite from the shell (built-in models, CPU) under the CPU's default plan and under the GPU's
(`--determinism=sample --companions=sample`), on the bundled media and with the smallest count of extra videos; the
figure is the suite's own cost line, `forward tokens: R x the one-pass minimum`.
Shard balance: the shards of the suite's plan (`vitparity.suite.cases`: the same cases, groups and shard rule the
suite uses, no forward run) for each count of extra videos, each budget and N = 2, 3, 4: tokens per shard, the
busiest over the mean, and groups per shard (targets: <= 1.15x with 4 or more groups per shard, <= 1.3x with 2 or
more; every shard gets work when there are at least N groups).
"""

from __future__ import annotations

import re
from pathlib import Path

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.models import OneVisionEncoderConfig
from vitparity.suite.cases import collect_cases, make_groups, parse_shard
from vitparity.suite.settings import DEFAULT_PACK_TOKENS

from ..common import log, print_table
from ..workloads import write_media
from .suite_scale import run_measured, suite_command

RATIO = re.compile(r"^(\w+): forwards: .*forward tokens: ([\d.]+)x the one-pass minimum", re.M)
PLANS = {"cpu default": [], "gpu plan": ["--determinism=sample", "--companions=sample"]}
SHARDS = (2, 3, 4)


def scale_media(opts, workdir: Path, count: int) -> Path:
    """The suite-scale section's synthetic videos (same names, sizes and seed)."""
    height, width = opts.suite_scale_size
    folder = workdir / f"suite-scale-{count}-{height}x{width}x{opts.suite_scale_frames}"
    if not folder.exists():
        write_media(folder, [(f"scale_{i:03d}.mp4", opts.suite_scale_frames, height, width) for i in range(count)],
                    seed=500)
    return folder


def shard_balance(media: Path | None, budget: int, count: int) -> dict:
    """Tokens of each of `count` shards of the suite's plan (CPU defaults: crop, 8 frames, codec-style cases of 8
    frames' worth of tokens, the built-in patch)."""
    folders = [BUILTIN_MEDIA] + ([media] if media is not None else [])
    cases = collect_cases(folders, patch_size=OneVisionEncoderConfig().patch_size, align="crop", num_frames=8,
                          codec_frames=8)
    groups = make_groups(cases, budget)
    shards = [parse_shard(f"{k}/{count}").groups(groups) for k in range(1, count + 1)]
    tokens = [sum(group.tokens for group in shard) for shard in shards]
    mean = sum(tokens) / count
    return {"groups": len(groups), "groups_per_shard": [len(shard) for shard in shards], "tokens": tokens,
            "busiest_over_mean": max(tokens) / mean, "every_shard_works": all(shards) or len(groups) < count}


def run_suite_plan(opts, workdir: Path, results: dict) -> None:
    entry = results["suite_plan"] = {"efficiency": {}, "shards": []}
    small = opts.suite_scale_counts[0]
    rows = []
    for extra in (0, small):
        media = scale_media(opts, workdir, extra) if extra else None
        for plan, args in PLANS.items():
            command = suite_command(media, 0, None) + args
            run = run_measured(command, workdir / f"suite-plan-{extra}-{plan.replace(' ', '-')}.log",
                               opts.suite_timeout)
            ratio = float(RATIO.search("\n".join(run["cost_lines"])).group(2))
            entry["efficiency"][f"{extra}/{plan}"] = {**run, "ratio": ratio}
            rows.append([str(extra), plan, " ".join(args) or "-", str(run["passed"]), f"{run['wall_s']:.1f}",
                         run["cost_lines"][0].split(": ", 1)[1].split("; model loads")[0]])
            log(f"  {extra} extra videos, {plan}: {ratio:.2f}x the one-pass minimum")
    print_table(f"Forward plan efficiency, {results['machine']['device']}, built-in models, -m 'not golden'",
                ["extra", "plan", "options", "passed", "wall s", "forwards; forward tokens over the minimum"], rows)
    rows = []
    for extra in opts.suite_scale_counts:
        media = scale_media(opts, workdir, extra)
        for budget in sorted({DEFAULT_PACK_TOKENS["cpu"], opts.suite_scale_pack_tokens or 4096}):
            for count in SHARDS:
                found = shard_balance(media, budget, count)
                entry["shards"].append({"extra": extra, "budget": budget, "shards": count, **found})
                fewest = min(found["groups_per_shard"])
                target = "1.15x" if fewest >= 4 else "1.3x" if fewest >= 2 else "-"
                rows.append([str(extra), str(budget), str(count), str(found["groups"]),
                             " ".join(map(str, found["groups_per_shard"])), " ".join(map(str, found["tokens"])),
                             f"{found['busiest_over_mean']:.3f}", target,
                             "yes" if found["every_shard_works"] else "NO"])
    print_table("Shard balance (the suite's plan: cases, pack groups, --shard=K/N; no forward run)",
                ["extra videos", "budget", "N", "groups", "groups per shard", "tokens per shard", "busiest/mean",
                 "target", "every shard works"], rows)

"""What broke inside the first diverging layer: each step of that layer, captured on both sides and compared.

The per-layer trace (vitparity.trace) says where the two implementations part ways; this says what: one more
forward per side with hooks on the layer's public modules, named as the converter names them (vitparity.convert):

- hf: `encoder.layers.{i}.layer_norm1`, `self_attn.q_proj` / `k_proj` / `v_proj`, `self_attn.out_proj` (its input is
  the attention output before the projection), `layer_norm2` (its input is the residual), `mlp.fc1`, `mlp.fc2`
  (its input is the activation's output);
- packing: the same, with `self_attn.qkv` (split into q, k, v) and `self_attn.proj`.

Each captured value is compared per token in float32 (the packing side sliced to the sample's segment of the
pack), in dataflow order; the first step that departs is named. q and k after RoPE are not module outputs: a side
whose attention output is not attention(RoPE(q), RoPE(k), v) with the sample's positions and scale head_dim**-0.5
(vitparity's own 3-D RoPE, float32) is tested against hypotheses: the (t, h, w) axes permuted, no RoPE, rotation
of halves, its own rotary table (where its rotary module can be hooked), other softmax scales.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .compare import Comparison, compare_features
from .extract import Sample, hf_hidden_states, packing_hidden_states, token_positions
from .models.layers import VisionRotary3D, rope_axis_dims, rotate_pairs
from .precision import Bars

# Steps in dataflow order: key -> words. "rope" is derived (never captured): named when a RoPE hypothesis explains
# a departing attention output.
# Each step is the first that departs only when every earlier one agrees: hence "its input equal".
STEP_WORDS = {
    "input": "the layer input",
    "layer_norm1": "the pre-attention norm layer_norm1 (its input equal)",
    "q": "q after projection (its input equal)",
    "k": "k after projection (its input equal)",
    "v": "v after projection (its input equal)",
    "rope": "q after RoPE (q before RoPE equal)",
    "attention": "attention (q, k, v equal; the output before the projection differs)",
    "proj": "the attention projection (its input equal)",
    "residual": "the residual (layer input + projection)",
    "layer_norm2": "the post-attention norm layer_norm2 (its input equal)",
    "fc1": "mlp.fc1 (its input equal)",
    "activation": "the MLP activation (mlp.fc2's input; mlp.fc1 equal)",
    "fc2": "mlp.fc2 (its input equal)",
    "output": "the layer output (residual + MLP)",
}
COMPARED = tuple(key for key in STEP_WORDS if key != "rope")
AXES = "thw"
ROTARY_MODULES = ("rotary", "video_rope", "rotary_emb")  # vitparity's, the release hf's, the release packing's
# (step, module under encoder.layers.{i} ("" = the layer), "input" or "output"): where each step is captured.
_POINTS = (
    ("input", "", "input"), ("layer_norm1", "layer_norm1", "output"),
    ("q", "self_attn.q_proj", "output"), ("k", "self_attn.k_proj", "output"), ("v", "self_attn.v_proj", "output"),
    ("qkv", "self_attn.qkv", "output"),
    ("attention", "self_attn.out_proj", "input"), ("proj", "self_attn.out_proj", "output"),
    ("attention", "self_attn.proj", "input"), ("proj", "self_attn.proj", "output"),
    ("residual", "layer_norm2", "input"), ("layer_norm2", "layer_norm2", "output"),
    ("fc1", "mlp.fc1", "output"), ("activation", "mlp.fc2", "input"), ("fc2", "mlp.fc2", "output"),
    ("output", "", "output"),
)
# The module each linear step belongs to, per layout (the converter's names).
_LINEARS = {
    "q": ("self_attn.q_proj", "self_attn.qkv (q rows)"), "k": ("self_attn.k_proj", "self_attn.qkv (k rows)"),
    "v": ("self_attn.v_proj", "self_attn.qkv (v rows)"), "proj": ("self_attn.out_proj", "self_attn.proj"),
    "fc1": ("mlp.fc1", "mlp.fc1"), "fc2": ("mlp.fc2", "mlp.fc2"),
    "layer_norm1": ("layer_norm1", "layer_norm1"), "layer_norm2": ("layer_norm2", "layer_norm2"),
}
CONSTANT_OFFSET = 1e-2  # a difference whose rows deviate from their mean by less than this (relative) is a bias


@dataclass(frozen=True)
class StepRow:
    """One step of the layer compared token by token in float32: min cosine, max abs difference, verdict."""

    step: str
    min_cos: float
    max_abs: float
    passed: bool


@dataclass(frozen=True)
class StepDiagnosis:
    """What departs first inside layer `layer` (hidden_states[layer], the output of encoder.layers[layer - 1]).

    step: a STEP_WORDS key, or None when no captured step departs; cause: what explains it, in words ("" when
    nothing more is known); rows: every captured step compared; missing: steps that could not be captured, and why.
    """

    layer: int
    step: str | None
    cause: str
    rows: tuple[StepRow, ...] = ()
    missing: tuple[str, ...] = ()

    def words(self) -> str:
        """`q after RoPE (q before RoPE equal): the rotary embedding, h/w axes (packing)`, or why nothing is named."""
        if self.step is None:
            return self.cause or "no captured step departs"
        return STEP_WORDS[self.step] + (f": {self.cause}" if self.cause else "")

    def format(self, labels: tuple[str, str]) -> str:
        """One line of min cosine per step (the first departure marked), and what could not be captured."""
        cells = [f"{row.step} {row.min_cos:.6f}" + (" <-" if row.step == self.step or (
            self.step == "rope" and row.step == "attention") else "") for row in self.rows]
        lines = [f"steps of layer {self.layer} (encoder.layers.{self.layer - 1}), min cos {labels[0]} vs "
                 f"{labels[1]}: " + (", ".join(cells) or "none captured")]
        lines += [f"not captured: {line}" for line in self.missing]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (non-finite numbers as None); `from_json` reads it back."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {"layer": self.layer, "step": self.step, "cause": self.cause, "missing": list(self.missing),
                "rows": [{"step": r.step, "min_cos": finite(r.min_cos), "max_abs": finite(r.max_abs),
                          "passed": r.passed} for r in self.rows]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StepDiagnosis":
        def num(value: float | None) -> float:
            return math.nan if value is None else float(value)

        rows = tuple(StepRow(r["step"], num(r["min_cos"]), num(r["max_abs"]), r["passed"]) for r in data["rows"])
        return cls(data["layer"], data["step"], data["cause"], rows, tuple(data["missing"]))


@dataclass
class _Captured:
    """One model's captured values: layer index -> step -> (rows, features) float32, and its rotary table."""

    layers: dict[int, dict[str, torch.Tensor]]
    missing: dict[int, list[str]]
    table: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (rows, head_dim) float32 of the rotary module


def _flat(value: Any) -> torch.Tensor | None:
    """A hook's tensor (the first of a tuple) as float32 (rows, features); None when there is no tensor."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor):
        return None
    return value.detach().float().reshape(-1, value.shape[-1])


@contextmanager
def _capture(model: torch.nn.Module, layers: set[int]) -> Iterator[_Captured]:
    """Hooks on `encoder.layers.{i}` for i in `layers` (and the rotary module) for the duration of the block."""
    captured = _Captured({i: {} for i in layers}, {i: [] for i in layers}, None)
    handles = []

    def keep(store: dict[str, torch.Tensor], step: str, where: str) -> Callable:
        if where == "input":
            def pre(module, args, kwargs):
                found = _flat(args[0] if args else next(iter(kwargs.values()), None))
                if found is not None:
                    store[step] = found
            return pre

        def post(module, args, output):
            found = _flat(output)
            if found is not None:
                store[step] = found
        return post

    try:
        for index in layers:
            try:
                layer = model.get_submodule(f"encoder.layers.{index}")
            except AttributeError:
                captured.missing[index].append(f"no module encoder.layers.{index}")
                continue
            for step, path, where in _POINTS:
                try:
                    module = layer.get_submodule(path) if path else layer
                except AttributeError:
                    continue
                hook = keep(captured.layers[index], step, where)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if where == "input"
                               else module.register_forward_hook(hook))
        rotary = next((getattr(model, name) for name in ROTARY_MODULES
                       if isinstance(getattr(model, name, None), torch.nn.Module)), None)
        if rotary is not None:
            def table(module, args, output):
                if isinstance(output, tuple) and len(output) == 2:
                    captured.table = (_flat(output[0]), _flat(output[1]))
            handles.append(rotary.register_forward_hook(table))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    for index, store in captured.layers.items():
        if "qkv" in store:
            store["q"], store["k"], store["v"] = store.pop("qkv").chunk(3, dim=-1)


def _run_hf(model: torch.nn.Module, sample: Sample, layers: set[int], temporal_context: int | None) -> _Captured:
    with _capture(model, layers) as captured:
        hf_hidden_states(model, sample, temporal_context=temporal_context)
    return captured


def _run_packing(model: torch.nn.Module, pack: list[Sample], layers: set[int]) -> _Captured:
    with _capture(model, layers) as captured:
        packing_hidden_states(model, pack)
    return captured


def _rows_of(pack: list[Sample], sample: Sample) -> slice:
    """The sample's rows in its pack (held once; vitparity.trace checks it)."""
    start = 0
    for other in pack:
        if other is sample:
            return slice(start, start + sample.num_tokens)
        start += other.num_tokens
    raise ValueError(f"{sample.name}: not in its pack")


def _values(captured: _Captured, index: int, rows: slice, tokens: int, label: str) -> tuple[dict[str, torch.Tensor],
                                                                                             list[str]]:
    """The sample's values of layer `index` (each (tokens, features)) and the steps missing, with why."""
    store, missing = captured.layers[index], list(captured.missing[index])
    values = {}
    for step in COMPARED:
        if step not in store:
            missing.append(f"{label} {step}: no module of that name was called")
            continue
        value = store[step][rows]
        if value.shape[0] != tokens:
            missing.append(f"{label} {step}: {value.shape[0]} rows for {tokens} tokens")
            continue
        values[step] = value
    return values, missing


def _ok(a: torch.Tensor, b: torch.Tensor, threshold: float, bars: Bars | None) -> Comparison:
    return compare_features(a, b, threshold=threshold, bars=bars)


def _is_offset(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether outputs a and b (N, D) differ by the same vector at every token (N > 1)."""
    diff = b - a
    spread = (diff - diff.mean(dim=0)).norm() / diff.norm().clamp_min(1e-30)
    return diff.shape[0] > 1 and bool(spread < CONSTANT_OFFSET)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, D) -> (H, N, D/H)."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """(a, b) halves -> (-b, a): the other common rotation, not the release's pairs."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, table, rotate, scale: float) -> torch.Tensor:
    """Bidirectional attention of one sample, float32: q, k, v (N, D); table (cos, sin) (N, head_dim) or None (no
    RoPE); one head at a time to bound memory. Returns (N, D) before the projection."""
    out = []
    for qh, kh, vh in zip(_heads(q, heads), _heads(k, heads), _heads(v, heads)):
        if table is not None:
            cos, sin = table
            qh, kh = qh * cos + rotate(qh) * sin, kh * cos + rotate(kh) * sin
        out.append(F.scaled_dot_product_attention(qh[None], kh[None], vh[None], scale=scale)[0])
    return torch.stack(out, dim=1).reshape(q.shape[0], -1)


def _axes_words(perm: tuple[int, ...]) -> str:
    return "/".join(AXES[i] for i in range(3) if perm[i] != i)


def _table_axes(own: tuple[torch.Tensor, torch.Tensor], formula: tuple[torch.Tensor, torch.Tensor]) -> str:
    """The axes whose columns of the cos / sin table differ from the formula's ("" when none)."""
    sizes = rope_axis_dims(own[0].shape[-1])
    half, bounds = sum(sizes), [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    differ = []
    for axis in range(3):
        columns = [*range(bounds[axis], bounds[axis + 1]), *range(half + bounds[axis], half + bounds[axis + 1])]
        if any((a[:, columns] - b[:, columns]).abs().max() > 1e-3 for a, b in zip(own, formula)):
            differ.append(AXES[axis])
    return "/".join(differ)


def _hypotheses(positions: torch.Tensor, head_dim: int, theta: float, own) -> Iterator[tuple[str, str, Any, Callable,
                                                                                            float]]:
    """(step, cause, table, rotate, scale) to try on a side whose attention is not the correct one, in order."""
    rotary = VisionRotary3D(head_dim, theta)
    correct = rotary(positions)
    scale = head_dim ** -0.5
    for perm in itertools.permutations(range(3)):
        if perm != (0, 1, 2):
            yield "rope", f"the rotary embedding, {_axes_words(perm)} axes", rotary(positions[:, list(perm)]), \
                rotate_pairs, scale
    if own is not None and own[0].shape == correct[0].shape:
        axes = _table_axes(own, correct)
        if axes:
            yield "rope", (f"the rotary embedding, its cos/sin table in the {axes} axis columns (not the formula at "
                           "the sample's positions)"), own, rotate_pairs, scale
    yield "rope", "the rotary embedding is not applied", None, rotate_pairs, scale
    yield "rope", "the rotary embedding rotates (first half, second half) pairs instead of neighbouring ones", \
        correct, _rotate_halves, scale
    for value, words in ((1.0 / head_dim, "1/head_dim"), (1.0, "1"), (head_dim ** -0.25, "head_dim**-0.25")):
        yield "attention", f"softmax scale {words} instead of head_dim**-0.5", correct, rotate_pairs, value


def _attention_cause(sides: dict[str, dict[str, torch.Tensor]], tables: dict[str, Any], positions: torch.Tensor,
                     heads: int, theta: float, threshold: float, bars: Bars | None) -> tuple[str, str]:
    """(step, cause) of an attention output that departs while q, k and v agree: each side whose output is not
    the correct attention of its own q, k, v is tested against the hypotheses."""
    head_dim = next(iter(sides.values()))["q"].shape[-1] // heads
    correct = VisionRotary3D(head_dim, theta)(positions)
    found = []
    for label, values in sides.items():
        args = (values["q"], values["k"], values["v"], heads)
        if _ok(_attention(*args, correct, rotate_pairs, head_dim ** -0.5), values["attention"], threshold, bars).passed:
            continue
        for step, cause, table, rotate, scale in _hypotheses(positions, head_dim, theta, tables.get(label)):
            if _ok(_attention(*args, table, rotate, scale), values["attention"], threshold, bars).passed:
                found.append((step, f"{cause} ({label})"))
                break
        else:
            found.append(("attention", f"{label}'s is not the attention of its own q, k, v by any hypothesis tried "
                                       "(RoPE axes, table, rotation, softmax scale)"))
    if not found:
        return "attention", "each side's output is the correct attention of its own q, k, v"
    return found[0][0], "; ".join(cause for _, cause in found)


def _consistency_cause(step: str, sides: dict[str, dict[str, torch.Tensor]], act: Callable, threshold: float,
                       bars: Bars | None) -> str:
    """The side(s) whose residual, activation or output is not what its own captured inputs give."""
    rules = {
        "residual": (lambda s: s["input"] + s["proj"], "layer_norm2's input is not the layer input + the projection"),
        "activation": (lambda s: act(s["fc1"]), "mlp.fc2's input is not the config's activation of mlp.fc1's output"),
        "output": (lambda s: s["residual"] + s["fc2"], "the layer output is not the residual + mlp.fc2's output"),
    }
    expected, words = rules[step]
    wrong = [label for label, s in sides.items() if not _ok(expected(s), s[step], threshold, bars).passed]
    return f"{words} ({', '.join(wrong)})" if wrong else ""


def _module_cause(step: str, index: int, a: torch.Tensor, b: torch.Tensor, fused: tuple[bool, bool]) -> str:
    """`the bias of encoder.layers.2.mlp.fc2 (...)`: the module (each side's name where the layouts differ) and
    whether a bias (the same offset at every token) or the weight explains the difference."""
    names = " / ".join(dict.fromkeys(f"encoder.layers.{index}." + _LINEARS[step][1 if is_fused else 0]
                                     for is_fused in fused))
    if _is_offset(a, b):
        return f"the bias of {names} (the outputs differ by the same vector at every token)"
    return f"the weight of {names}" + (" (or its eps)" if step.startswith("layer_norm") else "")


def _is_fused(model: torch.nn.Module, index: int) -> bool:
    """Whether layer `index` projects q, k, v with one fused `self_attn.qkv` (the packing layout)."""
    try:
        model.get_submodule(f"encoder.layers.{index}.self_attn.qkv")
    except AttributeError:
        return False
    return True


def _diagnosis(layer: int, sides: dict[str, dict[str, torch.Tensor]], tables: dict[str, Any],
               fused: tuple[bool, bool], missing: list[str], positions: torch.Tensor, heads: int, theta: float,
               act: Callable, threshold: float, bars: Bars | None) -> StepDiagnosis:
    """Compare the captured steps of one sample in dataflow order and explain the first that departs."""
    index = layer - 1
    (a_label, a), (b_label, b) = sides.items()
    rows = []
    for step in COMPARED:
        if step in a and step in b:
            c = _ok(a[step], b[step], threshold, bars)
            rows.append(StepRow(step, c.min_cos, c.max_abs, c.passed))
    first = next((row.step for row in rows if not row.passed), None)
    cause = ""
    if first is None:
        cause = "no captured step departs" + (" (some could not be captured)" if missing else "")
    elif first in ("q", "k") and all(s in a and s in b for s in ("q", "k")) and \
            _ok(a["q"], b["k"], threshold, bars).passed and _ok(a["k"], b["q"], threshold, bars).passed:
        cause = "q and k exchanged (one side's q is the other's k)"
    elif first in _LINEARS:
        cause = _module_cause(first, index, a[first], b[first], fused)
    elif first == "attention" and all(s in v for v in (a, b) for s in ("q", "k", "v")):
        first, cause = _attention_cause(sides, tables, positions.to(a["q"].device), heads, theta, threshold, bars)
    elif first in ("residual", "activation", "output"):
        needs = {"residual": ("input", "proj"), "activation": ("fc1",), "output": ("residual", "fc2")}[first]
        if all(s in v for v in (a, b) for s in needs):
            cause = _consistency_cause(first, sides, act, threshold, bars)
    elif first == "input":
        cause = f"the layer's input differs although hidden_states[{index}] agrees"
    return StepDiagnosis(layer, first, cause, tuple(rows), tuple(missing))


def diagnose(hf_model: torch.nn.Module, packing_model: torch.nn.Module, samples: list[Sample], layers: list[int | None],
             *, pack: list[Sample] | None, temporal_context: int | None, threshold: float, bars: Bars | None,
             labels: tuple[str, str]) -> list[StepDiagnosis | None]:
    """The step that departs first inside layer `layers[j]` (a hidden_states index >= 1; None: not asked) of each
    sample, from one more forward per side: the non-packing model on each asked sample, the packing model once on
    `pack` (default: each asked sample alone). Compared with the threshold and `bars` as the layers are."""
    asked = [(sample, layer) for sample, layer in zip(samples, layers) if layer is not None and layer >= 1]
    if not asked:
        return [None] * len(samples)
    shared = _run_packing(packing_model, pack, {layer - 1 for _, layer in asked}) if pack is not None else None
    config = hf_model.config
    heads, theta, act = config.num_attention_heads, float(config.rope_theta), ACT2FN[config.hidden_act]
    found: dict[int, StepDiagnosis] = {}
    for sample, layer in asked:
        index = layer - 1
        own_pack = pack if pack is not None else [sample]
        captured = {labels[0]: (_run_hf(hf_model, sample, {index}, temporal_context), slice(None)),
                    labels[1]: (shared or _run_packing(packing_model, own_pack, {index}), _rows_of(own_pack, sample))}
        sides, missing, tables = {}, [], {}
        for label, (capture, where) in captured.items():
            sides[label], lost = _values(capture, index, where, sample.num_tokens, label)
            missing += lost
            if capture.table is not None and capture.table[0][where].shape[0] == sample.num_tokens:
                tables[label] = (capture.table[0][where], capture.table[1][where])
        fused = (_is_fused(hf_model, index), _is_fused(packing_model, index))
        found[id(sample)] = _diagnosis(layer, sides, tables, fused, missing, token_positions(sample), heads, theta,
                                       act, threshold, bars)
    return [found.get(id(sample)) for sample in samples]

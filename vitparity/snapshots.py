"""Golden reference snapshots of features: a syrupy extension storing one deterministic `.npz` per case and model.

What is stored (a fixed reduction, so goldens of real-size models stay small):
- `projection` (N, k) float16: every token's features times a fixed Gaussian matrix (D, k) / sqrt(k), drawn
  with numpy's frozen legacy generator `RandomState(PROJECTION_SEED)`; k = min(PROJECTION_DIM, D). Rounding
  to float16 moves a projected cosine by about 1e-7, far below the tightest tolerance;
- `norms` (N,) float32: every token's L2 norm;
- `meta`: UTF-8 JSON (as a uint8 array) with dtype, device, model fingerprint, feature shape, grid, media sha256 and versions.
A golden matches when token count, width and grid are equal, the media hash is the same, the minimum per-token
cosine of the projections exceeds the dtype's tolerance and every norm agrees within its relative tolerance.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from .compare import cosine_per_token
from .features_io import temporary_file
from .provenance_diff import ProvenanceDiff, provenance_diff

PROJECTION_SEED = 20261122
PROJECTION_DIM = 16


@dataclass(frozen=True)
class GoldenTolerance:
    """Golden comparison limits for one dtype (looser than the live parity check: goldens cross machines)."""

    min_cos: float
    norm_rtol: float


GOLDEN_TOLERANCES = {
    "float32": GoldenTolerance(min_cos=0.99999, norm_rtol=1e-3),
    "float16": GoldenTolerance(min_cos=0.999, norm_rtol=1e-2),
    # norm: no tighter than the live parity's bfloat16 norm-gap bar (vitparity.precision.DEFAULT_NORM_GAP, the same
    # per-token measure); numerics-only changes (RoPE in bf16) reach 3.2e-2 on a codec-style case of the tiny model
    "bfloat16": GoldenTolerance(min_cos=0.99, norm_rtol=1e-1),
}


class GoldenRefused(RuntimeError):
    """Raised instead of writing a golden of a broken pair (parity fails for the case, or weights are not sane)."""


class GoldenCorrupt(ValueError):
    """A golden file that cannot be read."""


def projection_matrix(width: int, k: int = PROJECTION_DIM) -> np.ndarray:
    """The fixed (width, min(k, width)) projection used by every golden."""
    k = min(k, width)
    rng = np.random.RandomState(PROJECTION_SEED)
    return (rng.standard_normal((width, k)) / np.sqrt(k)).astype(np.float32)


def reduce_features(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 -> (projection (N, k) float16, norms (N,) float32).

    A torch tensor is reduced where it is (e.g. on the GPU): only the (N, k) and (N,) results are copied.
    """
    if type(features).__module__.startswith("torch"):
        import torch

        x = features.detach().float()
        matrix = torch.from_numpy(projection_matrix(x.shape[1])).to(x.device)
        return (x @ matrix).cpu().numpy().astype(np.float16), torch.linalg.vector_norm(x, dim=1).cpu().numpy()
    x = np.asarray(features, dtype=np.float32)
    return (x @ projection_matrix(x.shape[1])).astype(np.float16), np.linalg.norm(x, axis=1).astype(np.float32)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class GoldenData:
    """What a golden test asserts: the reduced features of one case and model, plus how they were made."""

    projection: np.ndarray = field(repr=False)
    norms: np.ndarray = field(repr=False)
    meta: dict = field(repr=False)
    refusal: str = ""  # why these features must never become a golden (the extension then refuses to write)
    case: str = ""

    @classmethod
    def from_reduction(cls, projection: np.ndarray, norms: np.ndarray, feature_shape: list[int], meta: dict, *,
                       refusal: str = "", case: str = "") -> "GoldenData":
        """From features already reduced by `reduce_features` (the features themselves need not be kept)."""
        meta = {**meta, "feature_shape": list(feature_shape), "projection_seed": PROJECTION_SEED}
        return cls(projection, norms, meta, refusal, case)

    def __repr__(self) -> str:  # short: pytest -l prints fixture and local reprs
        return f"GoldenData({self.case!r}, tokens={len(self.norms)}, dtype={self.meta.get('dtype')})"


def golden_file_stem(case_id: str) -> str:
    """The part of a golden's file name that comes from a case id: pytest writes non-ASCII characters of test
    ids as escapes (ü -> \\xfc) and syrupy drops characters that file names cannot hold (\\ / ? * : | " < >
    and control characters), so two different ids can share one golden file; cases are checked against this."""
    escaped = case_id.encode("unicode_escape").decode("ascii")
    return "".join(c for c in escaped if c not in '\\/?*:|"<>' and c.isprintable())


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive with fixed timestamps and order, so equal data gives equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2000, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def load_golden(data: bytes) -> tuple[np.ndarray, np.ndarray, dict]:
    """(projection, norms, meta) of serialised golden bytes; GoldenCorrupt when unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            projection, norms = archive["projection"], archive["norms"]
            meta = json.loads(archive["meta"].tobytes().decode("utf-8"))
    except Exception as err:  # zip, npy and JSON errors all mean the same thing here
        raise GoldenCorrupt(f"golden file is not a readable vitparity npz ({type(err).__name__}: {err})") from err
    return projection, norms, meta


@dataclass(frozen=True)
class Drift:
    """How far the reductions of the same tokens moved (float32 figures): projected cosine per token and relative
    norm difference per token, |a - b| / |b| with b the reference."""

    min_cos: float
    mean_cos: float
    worst_token: int
    max_norm_rel: float
    mean_norm_rel: float
    worst_norm_token: int


def reduction_drift(proj_a: np.ndarray, norms_a: np.ndarray, proj_b: np.ndarray, norms_b: np.ndarray) -> Drift:
    """Drift of reduction a from reference b; both (N, k) projections and (N,) norms of the same N > 0 tokens."""
    cos = cosine_per_token(proj_a.astype(np.float32), proj_b.astype(np.float32))
    rel = np.abs(norms_a.astype(np.float32) - norms_b) / np.maximum(np.abs(norms_b.astype(np.float32)), 1e-12)
    return Drift(float(cos.min()), float(cos.mean()), int(cos.argmin()), float(rel.max()), float(rel.mean()),
                 int(rel.argmax()))


@dataclass(frozen=True)
class GoldenDiff:
    """Why a golden does not match (empty `problems` when it does), and how its provenance differs."""

    problems: tuple[str, ...]
    min_cos: float = float("nan")
    max_norm_rel: float = float("nan")
    provenance: ProvenanceDiff | None = None


def compare_golden(current: bytes, golden: bytes) -> GoldenDiff:
    """Compare serialised current features with a serialised golden, within the golden dtype's tolerance."""
    proj_a, norms_a, meta_a = load_golden(current)
    proj_b, norms_b, meta_b = load_golden(golden)
    provenance = provenance_diff(meta_b, meta_a)
    problems = []
    for key in ("feature_shape", "grid_thw", "media_sha256", "dtype", "num_frames", "align"):
        if meta_a.get(key) != meta_b.get(key):
            problems.append(f"{key} differs: current {meta_a.get(key)} vs golden {meta_b.get(key)}")
    if proj_a.shape != proj_b.shape or norms_a.shape != norms_b.shape:
        problems.append(f"reduced shape differs: current {proj_a.shape} vs golden {proj_b.shape}")
        return GoldenDiff(tuple(problems), provenance=provenance)
    if not len(norms_a):
        problems.append("no tokens to compare")
        return GoldenDiff(tuple(problems), provenance=provenance)
    if not (np.isfinite(proj_a).all() and np.isfinite(norms_a).all()):
        problems.append("current features contain NaN or Inf")
        return GoldenDiff(tuple(problems), provenance=provenance)
    tolerance = GOLDEN_TOLERANCES[meta_b.get("dtype", "float32")]
    d = reduction_drift(proj_a, norms_a, proj_b, norms_b)
    if not d.min_cos > tolerance.min_cos:
        problems.append(f"min projected cosine {d.min_cos:.6f} <= {tolerance.min_cos} (worst token {d.worst_token})")
    if not d.max_norm_rel <= tolerance.norm_rtol:
        problems.append(f"max relative norm difference {d.max_norm_rel:.3e} > {tolerance.norm_rtol} "
                        f"(token {d.worst_norm_token})")
    return GoldenDiff(tuple(problems), d.min_cos, d.max_norm_rel, provenance)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NpzGoldenExtension(SingleFileSnapshotExtension):
    """One `.npz` golden per test under `golden_dir`; subclassed per model by `golden_extension()`."""

    file_extension = "npz"
    _write_mode = WriteMode.BINARY
    golden_dir: str = ""
    force_rewrite: bool = False

    def serialize(self, data, **kwargs) -> bytes:
        if not isinstance(data, GoldenData):
            raise TypeError(f"{type(self).__name__} stores GoldenData, got {type(data).__name__}")
        if data.refusal:
            raise GoldenRefused(f"refusing to write the golden of {data.case}: {data.refusal}")
        meta = np.frombuffer(json.dumps(data.meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        return _npz_bytes({"projection": data.projection, "norms": data.norms, "meta": meta})

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        if self.force_rewrite:
            return False
        return not compare_golden(serialized_data, snapshot_data).problems

    def diff_lines(self, serialized_data, snapshot_data):
        """Why a golden that exists does not match (a missing golden is said by `vitparity.suite.golden_state`)."""
        try:
            diff = compare_golden(serialized_data, snapshot_data)
        except GoldenCorrupt as err:
            yield str(err)
            return
        if diff.problems:
            yield from diff.provenance.lines()
        yield "golden features differ:" if diff.problems else "golden features match within tolerance"
        for problem in diff.problems:
            yield f"  - {problem}"

    @classmethod
    def dirname(cls, *, test_location) -> str:
        """<golden_dir>/<test module>/<test id>.npz: syrupy's own single-file layout under our root."""
        return str(Path(cls.golden_dir) / test_location.basename)

    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection, name_order=None) -> None:
        data = next(iter(snapshot_collection)).data
        _write_atomically(Path(snapshot_collection.location), data)


def golden_extension(golden_dir: str | Path, *, force_rewrite: bool = False) -> type[NpzGoldenExtension]:
    """An extension class writing into `golden_dir` (one folder per model fingerprint and dtype)."""
    name = "NpzGolden_" + hashlib.sha1(str(golden_dir).encode()).hexdigest()[:8]
    return type(name, (NpzGoldenExtension,), {"golden_dir": str(golden_dir), "force_rewrite": force_rewrite})


@dataclass(frozen=True)
class GoldenFolder:
    """What a golden folder's name says: `<model_type>-<fingerprint[:12]>-<dtype>-<F>of<C>-<align>`, the goldens
    of one model (weights fingerprint) under every setting that changes its features."""

    model_type: str
    fingerprint: str
    dtype: str
    num_frames: int
    context: int
    align: str

    @property
    def name(self) -> str:
        return f"{self.model_type}-{self.fingerprint}-{self.dtype}-{self.num_frames}of{self.context}-{self.align}"

    @property
    def settings(self) -> str:
        """The part of the name that is not the model: `float32-8of64-crop`."""
        return self.name.removeprefix(f"{self.model_type}-{self.fingerprint}-")

    @classmethod
    def parse(cls, name: str) -> "GoldenFolder | None":
        """The parts of a golden folder name; None when `name` is not one."""
        match = _FOLDER_NAME.fullmatch(name)
        if match is None:
            return None
        return cls(match["type"], match["fp"], match["dtype"], int(match["frames"]), int(match["context"]),
                   match["align"])


_FOLDER_NAME = re.compile(r"(?P<type>.+)-(?P<fp>[0-9a-f]{12})-(?P<dtype>float32|float16|bfloat16)-"
                          r"(?P<frames>\d+)of(?P<context>\d+)-(?P<align>[a-z_]+)")


def golden_shape(folder: Path) -> tuple[int | None, int | None]:
    """(feature width, layer count) that a golden folder's first golden records (None: not recorded; goldens written
    before the layer count was recorded lack it). GoldenCorrupt naming the file when it cannot be read;
    FileNotFoundError when the folder holds no golden."""
    path = next(iter(sorted(folder.glob("*/*.npz"))), None)
    if path is None:
        raise FileNotFoundError(f"{folder} holds no golden (.npz) file")
    try:
        _, _, meta = load_golden(path.read_bytes())
    except GoldenCorrupt as err:
        raise GoldenCorrupt(f"{path}: {err}") from None
    shape = meta.get("feature_shape") or [None, None]
    return shape[-1], meta.get("layers")


def _same_width(folder: Path, width: int | None) -> bool:
    """Whether the goldens of `folder` hold features of `width` (True when either is unknown)."""
    try:
        theirs = golden_shape(folder)[0]
    except (GoldenCorrupt, FileNotFoundError):
        return False
    return width is None or theirs is None or theirs == width


def other_model_folders_hint(folder: Path, width: int | None = None) -> list[str]:
    """Lines naming the golden folders next to `folder` of the same model type whose features can be compared
    with this run's (features of `width`; other weights or settings: e.g. the previous release's) and how to
    measure this model against one; [] when there is none (never the built-in tiny model's goldens for a real
    checkpoint: their width differs)."""
    parsed = GoldenFolder.parse(folder.name)
    if parsed is None or not folder.parent.is_dir():
        return []
    others = sorted(path.name for path in folder.parent.iterdir() if path.is_dir() and path != folder
                    and getattr(GoldenFolder.parse(path.name), "model_type", None) == parsed.model_type
                    and _same_width(path, width))
    if not others:
        return []
    same = [name for name in others if name.endswith(f"-{parsed.settings}")]
    example = folder.parent / (same or others)[0]
    return [f"golden folders of model type {parsed.model_type} in {folder.parent}: {', '.join(others)}",
            f"to measure this model against one (e.g. the previous release's), run with --golden-baseline={example} "
            f"(same dtype, frames and alignment: {parsed.settings})"]


def model_fingerprint(folder: str | Path, config: dict) -> str:
    """sha256 over the architecture config and the bytes of every weight file: equal only for the same model."""
    from .loading import weight_files
    from .models import ARCHITECTURE_FIELDS

    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in ARCHITECTURE_FIELDS}, sort_keys=True).encode())
    for path in weight_files(Path(folder)):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()

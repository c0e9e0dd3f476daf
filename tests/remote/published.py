"""Checkpoints whose code is the release's published files, byte for byte, read from the release repositories as
fetched into a local mirror (`RELEASE_MIRROR`, default /work/.mirror: one `<owner>+<name>/repo` git directory per
repository). The files are read at test time and never committed.

- hf: `onevision_encoder/configuration_onevision_encoder.py` and `modeling_onevision_encoder.py` of
  EvolvingLMMs-Lab/OneVision-Encoder (its newest fetched commit);
- packing: `model_factory/vit_preview_v0_packing_hf.py` of Feilong-Agent/OneVision-Encoder at the commit before
  6bac059 (the file raises ImportError unless transformers says flash-attn 2 is available, then imports it).
The weights are the built-in tiny checkpoints'.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING

MIRROR = Path(os.environ.get("RELEASE_MIRROR", "/work/.mirror"))
STUBS = Path(__file__).with_name("stubs")  # timm's registry decorator (see stubs/timm)
FILES = {
    "hf": ("EvolvingLMMs-Lab+OneVision-Encoder", "HEAD",
           {"configuration_onevision_encoder.py": "onevision_encoder/configuration_onevision_encoder.py",
            "modeling_onevision_encoder.py": "onevision_encoder/modeling_onevision_encoder.py"}),
    "packing": ("Feilong-Agent+OneVision-Encoder", "6bac059~1",
                {"vit_preview_v0_packing_hf.py": "model_factory/vit_preview_v0_packing_hf.py"}),
}
AUTO_MAP = {
    "hf": {"AutoConfig": "configuration_onevision_encoder.OneVisionEncoderConfig",
           "AutoModel": "modeling_onevision_encoder.OneVisionEncoderModel"},
    "packing": {"AutoConfig": "vit_preview_v0_packing_hf.LlavaViTPackingConfig",
                "AutoModel": "vit_preview_v0_packing_hf.LlavaViTPackingModel"},
}
MODEL_TYPES = {"hf": "onevision_encoder", "packing": "llava_vit_packing"}


def missing_sources() -> str | None:
    """Why the published files cannot be read here (a repository not fetched), or None."""
    for repo, _, _ in FILES.values():
        if not (MIRROR / repo / "repo").is_dir():
            return f"the release repository {repo.replace('+', '/')} is not fetched into {MIRROR} (RELEASE_MIRROR)"
    return None


def published_file(side: str, name: str) -> bytes:
    repo, revision, paths = FILES[side]
    return subprocess.run(["git", "--git-dir", str(MIRROR / repo / "repo"), "show", f"{revision}:{paths[name]}"],
                          check=True, capture_output=True).stdout


def published_checkpoint(side: str, folder: Path) -> Path:
    """The built-in tiny checkpoint of `side` with the published code files in it and named by its auto_map."""
    folder = Path(shutil.copytree(BUILTIN_HF if side == "hf" else BUILTIN_PACKING, folder))
    for name in FILES[side][2]:
        (folder / name).write_bytes(published_file(side, name))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=MODEL_TYPES[side], auto_map=AUTO_MAP[side])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder

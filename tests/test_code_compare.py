"""The two checkpoints' own modeling files compared in their shared parts, before any forward (vitparity.code_compare):
the release-format files as written share everything; a packing file with its own rotate function, rotary class or
attention scale is named, part by part."""

from __future__ import annotations

import shutil
from pathlib import Path

from vitparity.code_compare import shared_code_differences

RELEASE = Path(__file__).parent / "remote" / "release"
HF, PACKING = "modeling_onevision_encoder.py", "modeling_onevision_encoder_packing.py"


def _files(tmp_path: Path, edits: list[tuple[str, str]] = ()) -> tuple[list[Path], list[Path]]:
    for name in (HF, PACKING):
        shutil.copyfile(RELEASE / name, tmp_path / name)
    packing = tmp_path / PACKING
    text = packing.read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    packing.write_text(text)
    return [tmp_path / HF], [packing]


def test_release_files_as_written_share_every_part(tmp_path: Path) -> None:
    assert shared_code_differences(*_files(tmp_path)) == []


def test_a_docstring_or_a_name_alone_is_no_difference(tmp_path: Path) -> None:
    own_mlp = ('class PackingMLP(nn.Module):\n    """fc1, gelu, fc2."""\n\n    def __init__(self, config):\n'
               '        super().__init__()\n        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)\n'
               '        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)\n'
               '        self.approximate = "tanh" if "tanh" in config.hidden_act else "none"\n\n'
               '    def forward(self, x):\n'
               '        return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate=self.approximate))\n\n\n')
    hf, packing = _files(tmp_path, [("class PackingAttention", own_mlp + "class PackingAttention")])
    assert shared_code_differences(hf, packing) == ["MLP: hf OneVisionEncoderMLP and packing PackingMLP differ"]


def test_each_shared_part_written_differently_is_named(tmp_path: Path) -> None:
    hf, packing = _files(tmp_path, [
        ("    OneVisionEncoderEncoder, OneVisionEncoderHead, OneVisionEncoderMLP, make_norm, rotate_pairs,\n",
         "    OneVisionEncoderEncoder, OneVisionEncoderHead, OneVisionEncoderMLP, make_norm,\n"),
        ("class PackingAttention", "def rotate_pairs(x):\n    a, b = x.chunk(2, dim=-1)\n"
                                   "    return torch.cat((-b, a), dim=-1)\n\n\nclass PackingAttention"),
        ("        self.scale = self.head_dim ** -0.5\n", "        self.scale = 1.0 / self.head_dim\n"),
    ])
    assert shared_code_differences(hf, packing) == [
        f"rotate_pairs: {HF} and {PACKING} define it differently",
        "attention scale: hf OneVisionEncoderAttention.scale = self.head_dim ** (-0.5); "
        "packing PackingAttention.scale = 1.0 / self.head_dim",
    ]


def test_files_that_do_not_parse_compare_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    assert shared_code_differences([broken], [RELEASE / PACKING]) == []

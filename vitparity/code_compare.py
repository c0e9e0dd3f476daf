"""The two checkpoints' own modeling code compared, before any forward, in the parts both implementations share.

A release's hf and packing files should compute RoPE, the attention scale, the MLP and the norms the same way. Each
file is parsed (`ast`); its top-level functions and classes (the parts it defines itself: imports are shared by
construction) are matched across the two files by name, or else by the role they play:

- the rotary embedding (a class named like `*Rotary*` / `*Rope*`), the rotate function (`*rotate*`), the MLP
  (`*MLP`), the norm factory (a function named like `*norm*`);
- the attention scale: the value each attention class (`*Attention*`) gives `self.scale`.

Bodies are compared with docstrings left out and names of the unit itself ignored (`ast.dump` of the normalised
tree). A difference is a NOTE in the summary, never a verdict: parity and the reference decide.
"""

from __future__ import annotations

import ast
from pathlib import Path

# role -> (unit kind, words a name contains (lower case), or the name's suffix)
ROLES = {
    "rotary embedding": (ast.ClassDef, ("rotary", "rope")),
    "rotate function": (ast.FunctionDef, ("rotate",)),
    "MLP": (ast.ClassDef, ("mlp",)),
    "norm factory": (ast.FunctionDef, ("norm",)),
}


def _units(path: Path) -> dict[str, ast.AST]:
    """Top-level functions and classes a file defines: name -> node; {} when the file does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def _normalised(node: ast.AST) -> str:
    """The unit's tree without docstrings and without its own name, as `ast.dump` text."""
    copy = ast.parse(ast.unparse(node)).body[0]
    for unit in ast.walk(copy):
        body = getattr(unit, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            unit.body = body[1:] or [ast.Pass()]
    copy.name = "_"
    return ast.dump(copy)


def _scales(units: dict[str, ast.AST]) -> dict[str, str]:
    """Attention class name -> the expression it assigns to `self.scale` (source text)."""
    found = {}
    for name, node in units.items():
        if isinstance(node, ast.ClassDef) and "attention" in name.lower():
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign) and any(
                        isinstance(t, ast.Attribute) and t.attr == "scale" for t in sub.targets):
                    found[name] = ast.unparse(sub.value)
    return found


def _of_role(units: dict[str, ast.AST], kind: type, words: tuple[str, ...]) -> dict[str, ast.AST]:
    return {name: node for name, node in units.items()
            if isinstance(node, kind) and any(word in name.lower() for word in words)}


def shared_code_differences(hf_files: list[Path], packing_files: list[Path]) -> list[str]:
    """What the two checkpoints' code files compute differently in their shared parts, one line each (empty when
    they agree or share nothing comparable): same-named units with different bodies, units of the same role with
    different bodies, attention scales written differently."""
    hf = {name: (path.name, node) for path in hf_files if path.suffix == ".py" for name, node in _units(path).items()}
    packing = {name: (path.name, node) for path in packing_files if path.suffix == ".py"
               for name, node in _units(path).items()}
    lines: list[str] = []
    for name in sorted(hf.keys() & packing.keys()):
        (hf_file, a), (packing_file, b) = hf[name], packing[name]
        if _normalised(a) != _normalised(b):
            lines.append(f"{name}: {hf_file} and {packing_file} define it differently")
    for role, (kind, words) in ROLES.items():
        a = _of_role({n: node for n, (_, node) in hf.items() if n not in packing}, kind, words)
        b = _of_role({n: node for n, (_, node) in packing.items() if n not in hf}, kind, words)
        if a and b and not {_normalised(node) for node in a.values()} & {_normalised(node) for node in b.values()}:
            lines.append(f"{role}: hf {', '.join(sorted(a))} and packing {', '.join(sorted(b))} differ")
    scales = {side: _scales({n: node for n, (_, node) in units.items()})
              for side, units in (("hf", hf), ("packing", packing))}
    written = {side: set(found.values()) for side, found in scales.items()}
    if written["hf"] and written["packing"] and written["hf"] != written["packing"]:
        lines.append("attention scale: " + "; ".join(
            f"{side} " + ", ".join(f"{name}.scale = {value}" for name, value in sorted(scales[side].items()))
            for side in ("hf", "packing")))
    return lines


def pair_code_notes(files) -> list[str]:
    """`shared_code_differences` of a pair (`vitparity.pair.PairFiles`) whose two checkpoints both run their own code
    (`checkpoint_code.CodeRecord.files`, in each checkpoint folder); empty otherwise."""
    from .checkpoint_code import CHECKPOINT_CODE

    code = files.code or {}
    if not all(side in code and code[side].source == CHECKPOINT_CODE for side in ("hf", "packing")):
        return []
    return shared_code_differences([files.hf.path / name for name in code["hf"].files],
                                   [files.packing.path / name for name in code["packing"].files])

"""The dimension legend (qdelta_jax.array_typing): every shape written in a signature or a
docstring of qdelta_jax and its kernels uses only the legend's letters, and the aliases are
shapes of those letters."""

from __future__ import annotations

import pathlib
import re

import pytest

from qdelta_jax import array_typing

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("qdelta_jax/*.py"), *ROOT.glob("pallas/*.py")])


def legend() -> set[str]:
    """The letters of the legend's table: the first column between the ``====`` rules."""
    table = array_typing.__doc__.split("\n======  ====")[2]
    letters = set()
    for line in table.splitlines()[1:]:
        if line[:1].strip():
            letters.update(s.strip() for s in line[:8].split(","))
    return letters - {""}


LETTERS = legend()


def dims(shape: str) -> list[str]:
    """The size names of a shape: ``"B S+1"`` -> ``["B", "S"]``, ``"B W-1 E"`` -> ``B W E``;
    ``...`` and literal sizes are left out."""
    out = []
    for item in re.split(r"[\s,]+", shape.strip()):
        for name in re.split(r"[*+-]", item.lstrip("*")):
            if name and name != "..." and not name.isdigit():
                out.append(name)
    return out


def test_legend_has_the_letters_of_the_style():
    assert {"B", "T", "H", "HV", "K", "V", "C", "N", "S", "D", "W", "L", "NC", "Tp"} <= LETTERS
    assert "vocab" in LETTERS


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_annotated_shape_uses_the_legend(path):
    text = path.read_text()
    shapes = re.findall(r'(?:Float|Int|Bool)\[Array, "([^"]*)"\]', text)
    # Docstring shapes: ``name [A, B, ...]`` where every entry is a size expression.
    for m in re.finditer(r"\[((?:[A-Z][A-Za-z]*(?:[*+-][A-Z0-9][A-Za-z0-9]*)*(?:, )?)+)\]``",
                         text):
        shapes.append(m.group(1))
    bad = sorted({d for s in shapes for d in dims(s)} - LETTERS)
    assert not bad, f"{path.name}: letters outside the legend: {bad}"


def test_aliases_are_jaxtyping_shapes_of_legend_letters():
    names = [n for n in dir(array_typing) if n[:1].isupper() and n not in ("Array", "Bool",
                                                                          "Float", "Int")]
    assert names
    for name in names:
        alias = getattr(array_typing, name)
        parts = getattr(alias, "__args__", (alias,))
        for part in parts:
            assert set(dims(part.dim_str)) <= LETTERS, name

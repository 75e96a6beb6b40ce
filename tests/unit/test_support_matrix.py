"""docs/support-matrix.md says what each provider declares, capability by capability."""

from __future__ import annotations

from pathlib import Path

from thinvisor.providers import KINDS, provider_class
from thinvisor.providers.base import Capability

MATRIX = Path(__file__).resolve().parents[2] / "docs" / "support-matrix.md"


def _table() -> dict[str, dict[str, bool]]:
    """The first table: capability -> provider kind -> supported."""
    lines = [line for line in MATRIX.read_text().splitlines() if line.startswith("|")]
    kinds = [cell.strip() for cell in lines[0].strip("|").split("|")][1:]
    table: dict[str, dict[str, bool]] = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] not in {c.value for c in Capability}:
            break  # the next table
        table[cells[0]] = {kind: cell == "yes" for kind, cell in zip(kinds, cells[1:], strict=True)}
    return table


def test_the_matrix_lists_every_kind_and_capability() -> None:
    table = _table()
    assert set(table) == {c.value for c in Capability}
    assert all(set(row) == set(KINDS) for row in table.values())


def test_the_matrix_matches_what_each_provider_declares() -> None:
    table = _table()
    for kind in KINDS:
        declared = {c.value for c in provider_class(kind).capabilities}
        documented = {cap for cap, row in table.items() if row[kind]}
        assert documented == declared, kind

"""The layers point one way: ``capture`` (no I/O) depends on nothing of ours, ``storage`` on
``capture`` alone, ``gateway`` on both; migrations import none of them, so what an old
migration does never changes with today's code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from capture import rows
from capture.registry import RECORD_KINDS, ROUTES
from storage.schema import history_metadata

REPO = Path(__file__).resolve().parent.parent
OURS = ("capture", "storage", "gateway", "migrations", "fake_upstream", "bench", "tests")


def imported(folder: str) -> dict[str, set[str]]:
    """Each module of ``folder`` and the top-level packages of ours it imports."""
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names & set(OURS)
    return found


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [
        ("capture", {"capture"}),
        ("storage", {"capture", "storage", "migrations"}),  # it runs them
        ("migrations", {"migrations"}),
    ],
)
def test_a_layer_imports_only_the_layers_below_it(folder: str, allowed: set[str]) -> None:
    modules = imported(folder)
    assert len(modules) > 3
    assert {module: names - allowed for module, names in modules.items() if names - allowed} == {}


def test_every_table_a_record_names_is_a_history_table() -> None:
    named = {value for name, value in vars(rows).items() if name.isupper() and name != "Row"}
    assert named <= set(history_metadata.tables)
    assert {"completions", "request_logs"} <= named


def test_each_captured_route_has_a_record_kind_the_spool_reads_back() -> None:
    assert ("POST", "/v1/chat/completions") in ROUTES
    for api in ROUTES.values():
        assert RECORD_KINDS[api.kind] is api.record
    assert len(set(RECORD_KINDS)) == len(RECORD_KINDS) == len(ROUTES) + 2  # log, shaped

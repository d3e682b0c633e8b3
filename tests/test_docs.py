"""The README documents every setting the gateway reads, with its default, and the commands
it promises; the table of variables in the code covers every setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.settings import UPSTREAM_VARIABLES, VARIABLES, Settings, UpstreamSpec, Variable

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def readme_row(name: str) -> str:
    """The line of the README's table of variables that names ``name``."""
    rows = [
        line
        for line in README.splitlines()
        if line.startswith("| ") and f"`{name}`" in line.split("|")[1]
    ]
    assert rows, f"{name} is not in the README's table of variables"
    return rows[0]


def shown(default: object) -> str | None:
    """How the README writes a default, for a setting whose default is a plain value."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, int | str):
        return str(default)
    return None


def test_every_setting_is_read_from_exactly_one_variable() -> None:
    # ``upstreams`` is made of UPSTREAMS' names and each one's UPSTREAM_<NAME>_* variables.
    fields = [field.name for field in dataclasses.fields(Settings) if field.name != "upstreams"]
    assert sorted(v.field for v in VARIABLES) == sorted(fields)
    assert len({v.name for v in VARIABLES}) == len(VARIABLES)
    each = [field.name for field in dataclasses.fields(UpstreamSpec) if field.name != "name"]
    assert sorted(v.field for v in UPSTREAM_VARIABLES) == sorted(each)


@pytest.mark.parametrize("variable", UPSTREAM_VARIABLES, ids=lambda v: v.name)
def test_every_upstream_variable_is_in_the_readme_with_its_default(variable: Variable) -> None:
    default = getattr(UpstreamSpec, variable.field)
    last_column = readme_row(variable.name).rstrip(" |").rsplit("|", 1)[-1]
    if isinstance(default, tuple):
        default = ",".join(default)
    plain = shown(default) if default else None
    if plain is not None:
        assert f"`{plain}`" in last_column, (variable.name, plain, last_column)
    else:
        assert "unset" in last_column or "`" in last_column, (variable.name, last_column)


@pytest.mark.parametrize("variable", VARIABLES, ids=lambda v: v.name)
def test_every_variable_is_in_the_readme_with_its_default(variable: Variable) -> None:
    row = readme_row(variable.name)
    default = getattr(Settings, variable.field)
    plain = shown(default)
    last_column = row.rstrip(" |").rsplit("|", 1)[-1]
    if plain is not None:
        assert f"`{plain}`" in last_column, (variable.name, plain, last_column)
    else:  # unset, empty, or another variable's value
        assert "unset" in last_column or "`" in last_column, (variable.name, last_column)


def test_the_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    assert "python -m gateway" in README
    assert "scripts/test" in README
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
    assert "python -m pytest" in (REPO / "scripts" / "test").read_text()

"""The README documents every setting the gateway reads, and the commands it promises."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def settings_variables() -> set[str]:
    source = (REPO / "gateway" / "settings.py").read_text()
    return set(re.findall(r'env\.\w+\(\s*"([A-Z0-9_]+)"', source))


def test_every_environment_variable_the_gateway_reads_is_in_the_readme() -> None:
    variables = settings_variables()
    assert len(variables) > 15
    missing = sorted(name for name in variables if f"`{name}`" not in README)
    assert missing == []


def test_the_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    assert "python -m gateway" in README
    assert "scripts/test" in README
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
    assert "python -m pytest" in (REPO / "scripts" / "test").read_text()

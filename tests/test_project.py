"""The project's own promises: README commands, settings table, lint and types."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from forwarder.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _readme_commands() -> list[str]:
    return re.findall(r"```sh\n(python3 -m venv .venv && [^\n]+)\n```", README)


def test_ci_runs_the_readme_test_command_exactly() -> None:
    demo, tests = _readme_commands()
    assert demo.endswith("forwarder demo")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_settings_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(FORWARDER_[A-Z_]+)` \| ([^|]+) \|", README, re.M))
    expected = {f"FORWARDER_{name.upper()}" for name in Settings.model_fields}
    assert set(rows) == expected
    for name, field in Settings.model_fields.items():
        shown = rows[f"FORWARDER_{name.upper()}"].strip().strip("`")
        default = field.default
        if default is None:
            assert shown == "unset"
        elif isinstance(default, tuple):
            assert shown == ",".join(f"{d:g}" for d in default)
        elif isinstance(default, float):
            assert shown == f"{default:g}"
        else:
            assert shown == str(default), name


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_is_clean() -> None:
    check = _run("ruff", "check", ".")
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr

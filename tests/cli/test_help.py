"""`muster ... --help` reads like ECE's installer: what a flag takes is TEXT, INTEGER, PATH or a
choice, a switch takes nothing, and no Python type (`<str>`, `<bool>`, `<list[str]>`) shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_muster


@pytest.mark.parametrize(
    "command",
    [
        ["install"],
        ["start"],
        ["token", "create"],
        ["token", "delete"],
        ["runner", "delete"],
        ["allocator", "list"],
        ["proxy", "list"],
        ["coordinator", "list"],
        [],
    ],
)
def test_help_names_values_without_python_types(command: list[str], tmp_path: Path) -> None:
    result = run_muster([*command, "--help"], logs=tmp_path, name="help")
    assert result.returncode == 0, result.output
    assert "<" not in result.stdout, result.stdout
    assert "Show this message and exit." in result.stdout


def test_install_help_shows_what_each_flag_takes(tmp_path: Path) -> None:
    help_text = run_muster(["install", "--help"], logs=tmp_path, name="help").stdout
    assert re.search(r"--host-storage-path\s+PATH", help_text)
    assert re.search(r"--api-port\s+INTEGER", help_text)
    assert re.search(r"--availability-zone\s+TEXT", help_text)
    assert re.search(r"--no-start\s+set up only", help_text)  # a switch: nothing to give
    assert re.search(r"--rejoin\s+join again", help_text)

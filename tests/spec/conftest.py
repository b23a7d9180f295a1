"""Fixtures for the spec tests: spec files written into a temporary directory."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def spec_file(tmp_path: Path) -> Callable[..., Path]:
    """Write dedented YAML text to a file and return its path."""

    def write(text: str, name: str = "fleet.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write

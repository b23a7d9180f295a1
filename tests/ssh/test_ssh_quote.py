"""Quoting: values go through a real shell and come out literally, on a real node too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ssh_lab import SshLab

from fleet.errors import UsageError
from fleet.ssh import Target, env_prefix, shell_join

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.lists(_text, min_size=1, max_size=5))
def test_shell_join_survives_a_real_shell(args: list[str]) -> None:
    command = "printf '%s\\0' " + shell_join(args)
    out = subprocess.run(["sh", "-c", command], check=False, capture_output=True, timeout=10)
    assert out.stdout.decode().split("\0")[:-1] == args


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.from_regex(r"FT_[A-Za-z0-9_]{0,8}", fullmatch=True), _text, max_size=4))
def test_env_prefix_exports_values_literally(env: dict[str, str]) -> None:
    reader = "import os, sys; sys.stdout.write(''.join(os.environ[n] + chr(0) for n in sys.argv[1:]))"
    command = env_prefix(env) + shell_join([sys.executable, "-c", reader, *env])
    out = subprocess.run(["sh", "-c", command], check=False, capture_output=True, timeout=10)
    assert out.stdout.decode().split("\0")[:-1] == list(env.values())


@pytest.mark.parametrize("name", ["1A", "A-B", "A B", "A;B", "", "A=B", "$(x)"])
def test_bad_env_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        env_prefix({name: "v"})


def test_injection_through_env_values_arrives_literally(
    trio: SshLab, trio_targets: list[Target], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    values = [
        f"'; touch {marker} #",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f'"; touch {marker}; "',
        "line1\nline2",
        "back\\slash",
    ]
    env = {f"V{index}": value for index, value in enumerate(values)}
    printer = " ".join(f'"$V{index}"' for index in range(len(values)))
    with trio.executor() as executor:
        result = executor.run(trio_targets, f"printf '%s|' {printer}", env=env)
        more = executor.run(trio_targets[:1], shell_join(["printf", "%s|", *values]))
    assert result.ok, result.summary()
    for target in trio_targets:
        assert result[target.name].stdout == "|".join(values) + "|"
    assert more[trio_targets[0].name].stdout == "|".join(values) + "|"
    assert not marker.exists()

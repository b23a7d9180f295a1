"""The startup script: valid shell, every value quoted, sshd port only when needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fleet.providers.startup import render_startup_script


def render(tmp_path: Path, **overrides: object) -> Path:
    values = {
        "provider": "gcp",
        "fleet_name": "demo",
        "node": "demo-w1-g1",
        "role": "worker",
        "user": "fleet",
        "public_key": "ssh-ed25519 AAAAC3Nza comment",
        "ssh_port": 22,
        **overrides,
    }
    script = tmp_path / "startup.sh"
    script.write_text(render_startup_script(**values))  # type: ignore[arg-type]
    return script


def test_hostile_values_stay_quoted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    script = render(
        tmp_path,
        user=f"x$(touch {marker})",
        public_key=f"ssh-ed25519 AAAA '; touch {marker}; '",
        node=f"n\ntouch {marker}",
    )
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    header = script.read_text().split("# 1. ")[0]  # the quoted assignments, nothing else
    probe = tmp_path / "probe.sh"
    probe.write_text(header + 'printf "%s|" "$FLEET_USER" "$FLEET_PUBLIC_KEY" "$FLEET_NODE"\n')
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, check=True).stdout
    assert not marker.exists()
    assert out == f"x$(touch {marker})|ssh-ed25519 AAAA '; touch {marker}; '|n\ntouch {marker}|"


def test_sshd_port_block_only_for_another_port(tmp_path: Path) -> None:
    assert "Port $FLEET_SSH_PORT" not in render(tmp_path).read_text()
    text = render(tmp_path, ssh_port=2222).read_text()
    assert "FLEET_SSH_PORT=2222" in text and "Port %s" in text
    assert "apt-get install -y -qq sshfs fuse3" in text and "useradd --create-home" in text

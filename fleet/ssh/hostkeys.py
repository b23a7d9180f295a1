"""The fleet's own known_hosts file and the host key policy that enforces it.

Keys are pinned by node *name* (OpenSSH's `HostKeyAlias`), never by address: clouds
reuse addresses, and a replaced node gets a new name (see `fleet.model.worker_name`).
The file is OpenSSH's known_hosts format (`<alias> <type> <base64>`), so the OpenSSH
client can use it through the fleet's ssh_config. Writes take a lock file and replace
the file atomically: two `fleet` commands (or threads) may pin keys at the same time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko

from fleet.errors import HostKeyError, UsageError

_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate_alias(alias: str) -> str:
    """Node names are used as known_hosts aliases and ssh_config `Host` patterns."""
    if not isinstance(alias, str) or not _ALIAS.match(alias) or len(alias) > 253:
        raise UsageError(
            f"invalid node name {alias!r}",
            hint="node names are letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return alias


def normalize_key_line(key_line: str) -> str:
    """`"ssh-ed25519 AAAA... comment"` -> `"ssh-ed25519 AAAA..."`, checked."""
    parts = key_line.strip().split()
    if len(parts) < 2:
        raise HostKeyError(f"not a public key line: {key_line.strip()[:60]!r}")
    key_type, blob = parts[0], parts[1]
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise HostKeyError(f"not a public key line (bad base64): {key_line.strip()[:60]!r}") from None
    # The blob starts with its own type name; it must agree with the first word.
    if len(raw) < 4 or raw[4 : 4 + int.from_bytes(raw[:4], "big")].decode(errors="replace") != key_type:
        raise HostKeyError(f"public key type {key_type!r} does not match its data")
    return f"{key_type} {blob}"


def key_line_of(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def fingerprint(key_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint, for messages."""
    import hashlib

    blob = base64.b64decode(key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


class HostKeyStore:
    """Pinned host keys of one fleet, one `<alias> <key>` line per node."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.RLock()

    # -- reading -----------------------------------------------------------------------
    def _entries(self) -> list[tuple[str, str]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "@", "|")):
                continue
            parts = line.split()
            if len(parts) < 3:
                continue
            for host in parts[0].split(","):
                entries.append((host, f"{parts[1]} {parts[2]}"))
        return entries

    def keys(self, alias: str) -> list[str]:
        return [key for host, key in self._entries() if host == alias]

    def get(self, alias: str) -> str | None:
        keys = self.keys(alias)
        return keys[0] if keys else None

    def aliases(self) -> list[str]:
        return list(dict.fromkeys(host for host, _ in self._entries()))

    # -- writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _write(self, lines: list[str]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write("".join(f"{line}\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _raw_lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def pin(self, alias: str, key_line: str) -> None:
        """Record `key_line` for `alias`. Idempotent; a different key already pinned for
        the alias is refused with HostKeyError (call `forget` first if the node is gone)."""
        validate_alias(alias)
        key = normalize_key_line(key_line)
        with self._locked():
            pinned = self.keys(alias)
            if key in pinned:
                return
            if pinned:
                raise changed_key_error(alias, pinned[0], key, self.path)
            self._write([*self._raw_lines(), f"{alias} {key}"])

    def forget(self, alias: str) -> None:
        """Remove every key of `alias` (the node was deleted)."""
        with self._locked():
            lines = self._raw_lines()
            kept = []
            for line in lines:
                parts = line.split()
                hosts = parts[0].split(",") if parts and not line.lstrip().startswith("#") else []
                if alias in hosts:
                    rest = [h for h in hosts if h != alias]
                    if rest:
                        kept.append(" ".join([",".join(rest), *parts[1:]]))
                    continue
                kept.append(line)
            if kept != lines:
                self._write(kept)


def changed_key_error(alias: str, pinned: str, offered: str, path: Path) -> HostKeyError:
    return HostKeyError(
        f"host key of {alias} changed: pinned {fingerprint(pinned)}, the server offered "
        f"{fingerprint(offered)}; refusing to connect (this can be an impersonation)",
        node=alias,
        hint=(
            f"if the node was really replaced, run `fleet down` and `fleet up`, or remove "
            f"the line of {alias} from {path}"
        ),
    )


class PinnedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Checks a server's key against the fleet's store, by node name.

    `missing_host_key(client, alias, key)` must be called with the node's name as
    `alias` (the executor does this itself after the key exchange, so paramiko's own
    hostname-based lookup is never involved). The rules:
      - a key pinned for the alias: the server's key must be that key;
      - none pinned, `vouched` key given (the provider reported it): pin it, and the
        server's key must be it;
      - none pinned, `trust_on_first_use`: pin the key seen (the fleet just created
        the node);
      - otherwise refuse.
    """

    def __init__(
        self, store: HostKeyStore, *, vouched: str | None = None, trust_on_first_use: bool = False
    ) -> None:
        self.store = store
        self.vouched = normalize_key_line(vouched) if vouched else None
        self.trust_on_first_use = trust_on_first_use

    def missing_host_key(self, client: object, hostname: str, key: paramiko.PKey) -> None:
        alias = hostname
        offered = key_line_of(key)
        pinned = self.store.keys(alias)
        if not pinned and self.vouched:
            if offered != self.vouched:
                raise HostKeyError(
                    f"host key of {alias} is not the one its provider vouches for: vouched "
                    f"{fingerprint(self.vouched)}, the server offered {fingerprint(offered)}; refusing "
                    "to connect (something else answers at the node's address: this can be an impersonation)",
                    node=alias,
                    hint="nothing was sent to it; if the node was just re-created, run `fleet up` again",
                )
            self.store.pin(alias, self.vouched)
            pinned = [self.vouched]
        if pinned:
            if offered not in pinned:
                raise changed_key_error(alias, pinned[0], offered, self.store.path)
            return
        if self.trust_on_first_use:
            self.store.pin(alias, offered)  # raises if another process pinned a different key
            return
        raise HostKeyError(
            f"host key of {alias} is unknown ({fingerprint(offered)}); refusing to connect",
            node=alias,
            hint=(
                f"the provider vouched for no host key of this node: `fleet up` reads it again; "
                f"for a machine fleet did not create, give its key (head.host_key) or list it in "
                f"ssh.trust_on_first_use, or add '{alias} {offered}' to {self.store.path} if you trust it"
            ),
        )

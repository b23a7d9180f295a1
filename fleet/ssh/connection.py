"""Opening one authenticated SSH transport to one node, fast and within a deadline.

paramiko's `SSHClient.connect` is bypassed for a plain `Transport` so that:
  - one deadline covers TCP connect, banner, key exchange and authentication (a listener
    that accepts and never speaks costs `connect_timeout`, not three times it);
  - the host key is checked against the node's *name* (PinnedHostKeyPolicy), not
    against paramiko's hostname lookup;
  - only the fleet's key is offered: no agent, no ~/.ssh lookups, no GSSAPI;
  - the algorithms are the cheap modern ones (curve25519 key exchange, ed25519 host
    keys first, AES-CTR/GCM): measurable when 32 handshakes share two cores.
Failures become fleet errors: `NodeUnreachable` (retryable: the node may be booting),
`AuthError`, `HostKeyError`, `SSHError`.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from pathlib import Path

import paramiko

from fleet.errors import AuthError, FleetError, HostKeyError, SSHError
from fleet.ssh.hostkeys import HostKeyStore, PinnedHostKeyPolicy, validate_alias
from fleet.ssh.results import Target

# Prefer the fast key exchange and host key types; the rest stay as fallbacks. mlkem is
# computed in Python by some paramiko versions, which is slow, so it is not offered.
_KEX_ORDER = (
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group14-sha256",
)
_CIPHER_ORDER = ("aes128-ctr", "aes256-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes192-ctr")
_RETRYABLE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTDOWN,
}
KEEPALIVE_S = 15

# Every paramiko failure becomes a per-node result here; its own tracebacks (logged at
# ERROR for a banner timeout) would only repeat them. Left alone if someone set a level.
if logging.getLogger("paramiko").level == logging.NOTSET:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)


class NodeUnreachable(SSHError):
    """The node did not answer (refused, timed out, closed during the handshake):
    it may still be booting, so retrying makes sense."""


def load_private_key(key_path: Path) -> paramiko.PKey:
    """The fleet's private key (never shown in errors: only its path)."""
    try:
        return paramiko.PKey.from_path(str(key_path))
    except FileNotFoundError:
        raise AuthError(f"the fleet's SSH key {key_path} does not exist") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise AuthError(f"cannot read the fleet's SSH key {key_path}: {type(exc).__name__}") from None


def _host_key_algorithms(key_lines: list[str]) -> list[str]:
    """The host key algorithms to negotiate so that the server shows the key we expect
    (a server with several host keys shows the type the client prefers)."""
    algorithms: list[str] = []
    for line in key_lines:
        key_type = line.split()[0]
        algorithms.extend(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key_type == "ssh-rsa" else [key_type])
    return list(dict.fromkeys(algorithms))


def _transport_options(transport: paramiko.Transport, expected_keys: list[str] | None = None) -> None:
    options = transport.get_security_options()
    if expected_keys:
        wanted = [a for a in _host_key_algorithms(expected_keys) if a in options.key_types]
        if wanted:
            options.key_types = wanted
    available_kex = set(options.kex)
    options.kex = [k for k in _KEX_ORDER if k in available_kex] or list(options.kex)
    available_ciphers = set(options.ciphers)
    options.ciphers = [c for c in _CIPHER_ORDER if c in available_ciphers] or list(options.ciphers)


def _where(target: Target) -> str:
    return f"{target.name} ({target.user}@{target.address}:{target.port})"


def open_transport(
    target: Target,
    pkey: paramiko.PKey,
    key_path: Path,
    store: HostKeyStore,
    *,
    timeout: float,
) -> paramiko.Transport:
    """Connect, check the host key by node name, authenticate with the fleet's key."""
    validate_alias(target.name)
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(0.05, deadline - time.monotonic())

    try:
        sock = socket.create_connection((target.address, target.port), timeout=remaining())
    except OSError as exc:
        raise _unreachable(target, exc, timeout) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    try:
        _transport_options(transport, store.keys(target.name) or ([target.host_key] if target.host_key else []))
        transport.banner_timeout = remaining()
        try:
            transport.start_client(timeout=remaining())
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise _unreachable(target, exc, timeout) from None
        try:  # start_client returns quietly when its timeout passes mid-handshake
            server_key = transport.get_remote_server_key()
        except paramiko.SSHException:
            raise _unreachable(target, TimeoutError("handshake timed out"), timeout) from None
        policy = PinnedHostKeyPolicy(
            store, vouched=target.host_key, trust_on_first_use=target.trust_on_first_use
        )
        try:
            policy.missing_host_key(None, target.name, server_key)
        except HostKeyError as exc:
            exc.node = target.name
            raise
        transport.auth_timeout = remaining()
        try:
            transport.auth_publickey(target.user, pkey)
        except paramiko.AuthenticationException:
            raise AuthError(
                f"{_where(target)} refused the fleet's key {key_path}",
                node=target.name,
                hint="check that the node has the fleet's public key in its authorized_keys",
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if not transport.is_active() or "timeout" in str(exc).lower():
                raise _unreachable(target, exc, timeout) from None
            raise SSHError(f"authentication with {_where(target)} failed: {exc}", node=target.name) from None
        if not transport.is_authenticated():
            raise AuthError(f"{_where(target)} did not accept the fleet's key {key_path}", node=target.name)
        transport.set_keepalive(KEEPALIVE_S)
        return transport
    except BaseException:
        transport.close()
        raise


def _unreachable(target: Target, exc: BaseException, timeout: float) -> FleetError:
    if (
        isinstance(exc, (socket.timeout, TimeoutError))
        or "timed out" in str(exc).lower()
        or ("banner" in str(exc).lower() and "timeout" in str(exc).lower())
    ):
        reason = f"no answer within {timeout:g}s"
    elif isinstance(exc, OSError) and exc.errno in _RETRYABLE_ERRNOS:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "network error")
    elif isinstance(exc, OSError) and exc.errno is not None:
        reason = exc.strerror or str(exc)
    else:
        reason = str(exc) or type(exc).__name__
    return NodeUnreachable(
        f"cannot reach {_where(target)}: {reason}",
        node=target.name,
        hint="the node may be booting, stopped or preempted",
    )

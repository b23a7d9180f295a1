"""The mount key's confinement: a share account on the head that can do SFTP in the
shared directory and nothing else.

Every worker holds the mount key, so it must open no shell, no PTY, no forwarding and
nothing outside the shared directory. The standard OpenSSH way, set up by
`confine_script` (shell run as root on the head: directly, or through `sudo -n`):

- a system account `fs-<hash>` of its own (no password, shell nologin), unique per head
  sshd, whose group also holds the head user;
- the shared directory moved to `/srv/fleet-share/<account>/shared` (mode 2770, owner the
  head user, group the account: setgid, so head and workers both write; fleet's commands
  run with umask 002), the chroot `/srv/fleet-share/<account>` root-owned 0755, and the
  head user's `<shared.path>` a symlink to it;
- a `Match User <account>` block: `ChrootDirectory`, `ForceCommand internal-sftp -d
  /shared`, no forwarding of any kind, no PTY, no user rc, keys only from a root-owned
  file holding `restrict <mount key>`.

The block goes where the head's sshd reads it: the file named by `FLEET_SSHD_CONFIG`
(local nodes run their own sshd and say so in their environment), or a drop-in under
/etc/ssh/sshd_config.d, but only on a machine fleet's startup script booted (it leaves
/etc/fleet/node): the system sshd of any other machine is never touched. A root-owned owner file
`/srv/fleet-share/.owners/<account>` names that config: `release_share_accounts` finds
an account by it when its node goes away, also when fleet's own state was lost.

A head with a data disk (a disk that outlives it; `fleet.model.DATA_MOUNT` on clouds and
isolated local nodes, named by `/etc/fleet/data`, or `FLEET_DATA_DIR` for loopback local
nodes) keeps the shared directory on it: the chroot `/srv/fleet-share/<account>` is a
symlink to the disk's root (root-owned 0755: sshd checks the configured path's
components, then chroots through the link) and the shared directory is the disk's
`shared/`. A replacement head finds its files there; their group is re-assigned when the
new machine's ids differ.

Without root on the head (an ordinary user's local nodes, a head without sudo), the
script prints `UNCONFINED`: the mount key then falls back to the head user's account
with `restrict,command="internal-sftp -d <shared>"` (see `fallback_key_line`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleet.state import exclusive_lock

SHARE_ROOT = "/srv/fleet-share"
OWNERS = f"{SHARE_ROOT}/.owners"
KEYS = f"{SHARE_ROOT}/.keys"
SFTP_PATH = "/shared"  # the shared directory as the share account sees it (chroot-relative)
DROP_IN = "/etc/ssh/sshd_config.d/fleet-share-{account}.conf"
# Serialises the shared root's bookkeeping between fleets on one host (two local fleets in
# loopback mode): a fleet going down removes `.keys`/`.owners` when it leaves them empty,
# which must not happen between another fleet's `install -d` and its writes into them.
SHARE_LOCK = "/run/fleet-share.lock"
SHARE_FILE = ".fleet/share.json"  # per worker, 0600: how to reach the share
NODE_MARKER = "/etc/fleet/node"  # written by fleet's startup script (templates/startup/node.sh.j2)
DATA_MARKER = "/etc/fleet/data"  # the mounted data disk's path, written by the startup script
DATA_ERROR = "/etc/fleet/data.error"  # why the data disk could not be mounted
# Shell: the head's data directory ("" without one): loopback local nodes name it in their
# environment (set, maybe empty, on every such node), others in DATA_MARKER.
DATA_DIR_WORD = f'"${{FLEET_DATA_DIR-$(cat {DATA_MARKER} 2>/dev/null)}}"'


def data_disk_check() -> str:
    """Shell that fails (exit 4) when the head's data disk was wanted but is not mounted:
    the shared directory must never silently land on a boot disk that dies with the head."""
    return (f"if [ -f {DATA_ERROR} ]; then echo \"the head's data disk is not mounted: $(cat {DATA_ERROR})\" >&2; "
            "exit 4; fi")


def link_data_script(shared_word: str) -> str:
    """Shell (as the head user, unconfined heads) that makes the shared directory
    `shared_word` a symlink to the data directory's `shared/`, when there is one."""
    return (f'data={DATA_DIR_WORD}; if [ -n "$data" ] && [ ! -e {shared_word} ] && [ ! -L {shared_word} ]; then '
            f'mkdir -p "$data/shared" "$(dirname {shared_word})" && ln -s "$data/shared" {shared_word}; fi')


@dataclass(frozen=True)
class ShareEndpoint:
    """Where workers mount the shared directory from, as the head reported it."""

    user: str  # the share account (confined) or the head user (fallback)
    path: str  # as seen through SFTP: chroot-relative when confined
    confined: bool

    def describe(self, *, host: str, port: int, identity_file: str, known_hosts: str, alias: str) -> str:
        """The JSON of `~/.fleet/share.json` on a worker."""
        return json.dumps({
            "host": host, "port": port, "user": self.user, "path": self.path,
            "identity_file": identity_file, "known_hosts": known_hosts, "host_key_alias": alias,
            "confined": self.confined, "protocol": "sftp",
        }, indent=1) + "\n"


def fallback_key_line(mount_public_key: str, shared_dir: str) -> str:
    """The mount key on the head user's own account: forced SFTP from the shared dir."""
    return f'restrict,command="internal-sftp -d {shared_dir}" {mount_public_key.strip()}'


def confine_script(*, shared_path: str, head_user_word: str, mount_public_key: str) -> str:
    """Shell (run as root on the head) that creates or refreshes the share account and
    prints `SHARE <account> <sftp path>`. `shared_path` is a shell word of the head
    user's shared directory (absolute once expanded); idempotent."""
    q = shlex.quote
    key_line = f"restrict {mount_public_key.strip()}"
    return "\n".join([
        "set -eu",
        'cfg="${FLEET_SSHD_CONFIG:-}"; pidfile="${FLEET_SSHD_PID:-}"',
        'ident="${cfg:-/etc/ssh/sshd_config}"',
        # Decide before touching anything: a node's own sshd (local nodes say where), or
        # the system's sshd of a machine fleet's startup script booted (never another host).
        'if [ -n "$cfg" ]; then',
        '  if [ "$(stat -c %u "/proc/$(cat "$pidfile")" 2>/dev/null)" != 0 ]; then',
        '    echo "UNCONFINED the head\'s sshd does not run as root"; exit 0',
        "  fi",
        f"elif [ ! -f {q(NODE_MARKER)} ]; then",
        '  echo "UNCONFINED this machine was not booted by fleet\'s startup script"; exit 0',
        "elif ! grep -qsE '^Include /etc/ssh/sshd_config.d/' /etc/ssh/sshd_config; then",
        '  echo "UNCONFINED its sshd reads no /etc/ssh/sshd_config.d"; exit 0',
        "fi",
        data_disk_check(),
        'account="fs-$(printf %s "$ident" | sha256sum | cut -c1-12)"',
        f"exec 9>>{q(SHARE_LOCK)}; if command -v flock >/dev/null 2>&1; then flock 9; fi",
        f"root={q(SHARE_ROOT)}; chroot=\"$root/$account\"; owner={head_user_word}; link={shared_path}",
        f"data={DATA_DIR_WORD}",
        'install -d -m 0755 -o root -g root "$root" "$root/.owners" "$root/.keys"',
        # With a data disk the chroot is a link to it (see the module docstring).
        'if [ -n "$data" ] && [ "$(readlink "$chroot" 2>/dev/null)" != "$data" ]; then',
        '  if [ -d "$chroot" ] && [ ! -L "$chroot" ]; then echo "$chroot exists beside the data disk $data" >&2; exit 3; fi',
        '  chown root:root "$data"; chmod 0755 "$data"; rm -f "$chroot"; ln -s "$data" "$chroot"',
        "fi",
        'install -d -m 0755 -o root -g root "$chroot"',
        'printf "%s\\n" "$ident" > "$root/.owners/$account"',
        'if ! id -u "$account" >/dev/null 2>&1; then',
        ('  useradd --system --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin '
         '--comment "fleet share account" "$account"'),
        "fi",
        "usermod -p '*' \"$account\" >/dev/null  # not locked (sshd without PAM refuses locked ones), no password",
        '[ "$owner" = root ] || usermod -a -G "$account" "$owner"',
        'if [ ! -L "$link" ] && [ -d "$link" ]; then',
        '  if [ -e "$chroot/shared" ]; then echo "both $link and $chroot/shared exist" >&2; exit 3; fi',
        '  mv "$link" "$chroot/shared"',
        "fi",
        'if [ ! -d "$chroot/shared" ]; then install -d -m 2770 -o "$owner" -g "$account" "$chroot/shared"; fi',
        # Once per owner/group pair: files a head of another machine (other ids) left on the data disk.
        'ids="$(id -u "$owner"):$(id -g "$account")"',
        'if [ "$(cat "$chroot/.fleet-share" 2>/dev/null)" != "$ids" ]; then',
        '  chown -R "$owner:$account" "$chroot/shared"; chmod -R g+rwX "$chroot/shared"',
        '  find "$chroot/shared" -type d -exec chmod g+s {} +; printf "%s\\n" "$ids" > "$chroot/.fleet-share"',
        "fi",
        'chmod 2770 "$chroot/shared"',
        'mkdir -p "$(dirname "$link")"; [ -L "$link" ] || ln -s "$chroot/shared" "$link"',
        f'printf "%s\\n" {q(key_line)} > "$root/.keys/$account.tmp"; chmod 0644 "$root/.keys/$account.tmp"',
        'mv "$root/.keys/$account.tmp" "$root/.keys/$account"',
        'block="# fleet-share $account begin',
        'Match User $account',
        '  AuthorizedKeysFile $root/.keys/$account',
        '  ChrootDirectory $chroot',
        f"  ForceCommand internal-sftp -d {SFTP_PATH}",
        "  PubkeyAuthentication yes",
        "  PasswordAuthentication no",
        "  AllowTcpForwarding no",
        "  AllowStreamLocalForwarding no",
        "  AllowAgentForwarding no",
        "  X11Forwarding no",
        "  PermitTunnel no",
        "  PermitTTY no",
        "  PermitUserRC no",
        '# fleet-share $account end"',
        "changed=''",
        'if [ -n "$cfg" ]; then',
        '  if ! grep -qxF "# fleet-share $account begin" "$cfg"; then printf "\\n%s\\n" "$block" >> "$cfg"; changed=1; fi',
        '  if grep -q "^AllowUsers " "$cfg" && ! grep -q "^AllowUsers .* $account\\( \\|$\\)" "$cfg"; then',
        '    sed -i "s/^AllowUsers .*/& $account/" "$cfg"; changed=1',
        "  fi",
        '  if [ -n "$changed" ]; then sshd -t -f "$cfg"; kill -HUP "$(cat "$pidfile")"; sleep 0.5; fi',
        "else",
        f'  dropin=$(printf %s {q(DROP_IN)} | sed "s/{{account}}/$account/")',
        '  if [ "$(cat "$dropin" 2>/dev/null)" != "$block" ]; then',
        '    printf "%s\\n" "$block" > "$dropin.tmp"; mv "$dropin.tmp" "$dropin"; sshd -t',
        '    systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || kill -HUP "$(cat /run/sshd.pid)"',
        "    sleep 0.5",
        "  fi",
        "fi",
        f'echo "SHARE $account {SFTP_PATH}"',
    ])


def as_root(script: str) -> str:
    """Run `script` as root on a node: directly when root, else with `sudo -n`; print
    `UNCONFINED no root` and succeed when neither is possible."""
    word = shlex.quote(script)
    return (f'if [ "$(id -u)" = 0 ]; then sh -c {word}; '
            f"elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then "
            f'sudo -n --preserve-env=FLEET_SSHD_CONFIG,FLEET_SSHD_PID,FLEET_DATA_DIR sh -c {word}; '
            f'else echo "UNCONFINED no root on the head"; fi')


def parse_share(stdout: str) -> tuple[str, str] | None:
    """(account, sftp path) from the script's output, or None when unconfined."""
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "SHARE":
            return parts[1], parts[2]
    return None


def release_share_accounts(sshd_config: Path) -> list[str]:
    """Remove the share accounts (user, group, chroot with the shared data, keys) whose
    owner file names `sshd_config`: the node serving them is going away. Root only;
    returns the accounts removed."""
    return _release(lambda owner: owner == str(sshd_config))


def release_orphan_share_accounts(prefix: str) -> list[str]:
    """Remove the share accounts of local nodes under `prefix` whose directory is gone
    (the node's files were deleted without `fleet down`)."""
    return _release(lambda owner: owner.startswith(prefix) and not os.path.exists(owner))


def _release(matches: Callable[[str], bool]) -> list[str]:
    if os.geteuid() != 0 or not Path(OWNERS).is_dir():
        return []
    with exclusive_lock(Path(SHARE_LOCK)):
        return _release_locked(matches)


def _release_locked(matches: Callable[[str], bool]) -> list[str]:
    owners = Path(OWNERS)
    if not owners.is_dir():
        return []
    removed = []
    for owner_file in owners.iterdir():
        try:
            if not matches(owner_file.read_text().strip()):
                continue
        except OSError:
            continue
        account = owner_file.name
        if not account.startswith("fs-") or not account[3:].isalnum():
            continue
        with contextlib.suppress(KeyError):
            pwd.getpwnam(account)
            subprocess.run(["userdel", account], check=False, capture_output=True, timeout=30)
        subprocess.run(["groupdel", account], check=False, capture_output=True, timeout=30)
        chroot = Path(SHARE_ROOT) / account
        if chroot.is_symlink():
            chroot.unlink()  # a link to the head's data disk, which outlives the head
        else:
            shutil.rmtree(chroot, ignore_errors=True)
        Path(KEYS, account).unlink(missing_ok=True)
        owner_file.unlink(missing_ok=True)
        removed.append(account)
    for directory in (OWNERS, KEYS, SHARE_ROOT):  # the last account leaves nothing behind
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return removed

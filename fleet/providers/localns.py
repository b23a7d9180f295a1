"""Isolated local nodes: every node a machine of its own, built from Linux namespaces.

The `namespaces` isolation of the local provider (and of the fake clouds' backing
nodes). A fleet gets one bridge with a subnet of its own (10.250.N.0/24; the host side,
.1, stands for the caller); each node gets

- a network namespace (`ip netns`) with one veth on that bridge and its own address,
  no default route, no NAT, no forwarding (nftables drops anything routed to or from
  the bridge; `fleet.testing.netpolicy` filters what crosses it);
- a mount namespace whose root is an overlay: the host's `/` as the read-only lower
  layer (the "image": /usr, /bin, /lib*, /sbin, /etc, /opt), the node's writes in
  `<node>/upper`; /root, /home, /tmp, /var/tmp and /work are the node's own empty
  directories, and the control plane's checkout, virtualenv, state and node root are
  masked, so nothing of the laptop leaks in;
- a PID namespace: the boot script is its init; killing it ends every process of the
  node and releases every mount made inside (sshfs), the way a preemption does.

Boot (`BOOT_SCRIPT`, run as root by `unshare`): build the root, pivot into it, run the
provider's rendered startup script, generate fresh host keys (the image's are removed),
record the public host key in the node's console directory (the provider's own record,
read by `list()`: never learnt from the network), then start sshd on port 22. The
console directory is the only path shared between the node and the provider.

Built on util-linux (`unshare`, `nsenter`, `pivot_root`), iproute2 and nftables rather
than hand-written syscalls: they are the tools an operator debugs these with, and each
step is one auditable command.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

import fleet as fleet_package
from fleet.errors import DependencyError, ProviderError
from fleet.model import DATA_MOUNT
from fleet.providers.localnode import (
    FLEET_MARKER,
    MARKER,
    ROOT_MARKER,
    LocalNode,
    _cmdline_of,
    _pid_alive,
)
from fleet.providers.netpolicy import Rule, render_tables

SUBNETS = ipaddress.ip_network("10.250.0.0/16")  # test-local; never routed anywhere
TOOLS = ("unshare", "nsenter", "pivot_root", "ip", "nft", "sshd", "ssh-keygen")
NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/fleet-localns")  # flock files: one global (subnets), one per fleet (addresses)
GLOBAL_LOCK = LOCK_DIR / "subnets.lock"
BOOT_TIMEOUT_S = 120.0


def missing_for_namespaces() -> str | None:
    """Why namespace isolation cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "namespace isolation needs root"
    missing = [tool for tool in TOOLS if _which(tool) is None]
    if missing:
        return f"namespace isolation needs {', '.join(missing)} (apt-get install util-linux iproute2 nftables openssh-server)"
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "namespace isolation needs overlayfs (modprobe overlay)"
    except OSError:
        return "cannot read /proc/filesystems"
    return None


def require_namespaces() -> None:
    reason = missing_for_namespaces()
    if reason:
        raise DependencyError(reason, hint="or set local: {isolation: loopback} in the fleet spec")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (f"{d}/{tool}" for d in ("/usr/sbin", "/sbin", "/usr/bin") if os.path.exists(f"{d}/{tool}")), None)


def _run(*argv: str, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = _which(argv[0]) or argv[0]
    result = subprocess.run([tool, *argv[1:]], check=False, capture_output=True, text=True, timeout=60,
                            input=input_text)
    if check and result.returncode != 0:
        raise ProviderError(f"{' '.join(argv)}: {result.stderr.strip()[-400:]}")
    return result


def fleet_key(root: Path, fleet: str) -> str:
    """8 hex digits naming a fleet's network resources: unique per (node root, fleet)."""
    return hashlib.sha256(f"{Path(root).resolve()}\0{fleet}".encode()).hexdigest()[:8]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class FleetNetwork:
    """The bridge of one fleet and the names of everything hanging off it.

    Every name starts with the fleet key, so that `remove()` finds (and only finds) this
    fleet's resources, even when the node directories are gone."""

    key: str

    @classmethod
    def of(cls, root: Path, fleet: str) -> FleetNetwork:
        return cls(fleet_key(root, fleet))

    @property
    def bridge(self) -> str:
        return f"fb{self.key}"

    @property
    def table(self) -> str:
        return f"fleet_{self.key}"

    @property
    def veth_prefix(self) -> str:
        return f"fv{self.key}"

    def veth(self, nid: str) -> str:
        return f"fv{self.key}{nid}"

    def netns(self, nid: str) -> str:
        return f"fleet-{self.key}-{nid}"

    @property
    def lock(self) -> Path:
        return LOCK_DIR / f"{self.key}.lock"

    # -- the bridge ------------------------------------------------------------------------
    def subnet(self) -> ipaddress.IPv4Network | None:
        """The bridge's subnet when the bridge exists."""
        result = _run("ip", "-j", "addr", "show", "dev", self.bridge, check=False)
        if result.returncode != 0:
            return None
        for link in json.loads(result.stdout or "[]"):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    return ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
        return None

    def host_address(self) -> str:
        subnet = self.subnet()
        if subnet is None:
            raise ProviderError(f"bridge {self.bridge} is missing")
        return str(subnet.network_address + 1)

    def ensure(self) -> ipaddress.IPv4Network:
        """Create the bridge (with a free /24), its host address and the fleet's
        nftables table, once; return the subnet."""
        with _locked(GLOBAL_LOCK):
            subnet = self.subnet()
            if subnet is not None:
                return subnet
            subnet = self._free_subnet()
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            try:
                _run("ip", "addr", "add", f"{subnet.network_address + 1}/{subnet.prefixlen}", "dev", self.bridge)
                _run("ip", "link", "set", self.bridge, "up")
                # The bridge is not a way out: no IPv6 autoconfiguration, no forwarding.
                with contextlib.suppress(OSError):
                    Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")
                self.apply_policy(local_default_policy(subnet, self))
            except ProviderError:
                self.remove()
                raise
            return subnet

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = []
        result = _run("ip", "-j", "-4", "addr", check=False)
        for link in json.loads(result.stdout or "[]"):
            for info in link.get("addr_info", []):
                used.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
        routes = _run("ip", "-j", "-4", "route", "show", "table", "all", check=False)
        for route in json.loads(routes.stdout or "[]"):
            with contextlib.suppress(ValueError):
                if route.get("dst") not in (None, "default"):
                    used.append(ipaddress.ip_network(route["dst"], strict=False))
        candidates = list(SUBNETS.subnets(new_prefix=24))
        start = int(self.key, 16) % len(candidates)
        for i in range(len(candidates)):
            candidate = candidates[(start + i) % len(candidates)]
            if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
                return candidate
        raise ProviderError(f"no free /24 left in {SUBNETS} for a fleet bridge")

    def apply_policy(self, rules_text: str) -> None:
        """Replace the fleet's nftables tables with `rules_text` (rendered by netpolicy),
        atomically: one `nft -f` transaction, one writer at a time."""
        with _locked(LOCK_DIR / f"{self.key}.policy.lock"):
            script = ""
            for family in ("bridge", "inet"):
                if _run("nft", "list", "table", family, self.table, check=False).returncode == 0:
                    script += f"delete table {family} {self.table}\n"
            _run("nft", "-f", "-", input_text=script + rules_text)

    def allocate_address(self, taken: Iterable[str]) -> str:
        subnet = self.ensure()
        used = {*taken, str(subnet.network_address + 1)}
        for host in subnet.hosts():
            if str(host) not in used:
                return str(host)
        raise ProviderError(f"no free address left on {self.bridge} ({subnet})")

    # -- ports -----------------------------------------------------------------------------
    def add_port(self, nid: str, address: str) -> None:
        """A network namespace with eth0 on the bridge at `address`, and lo; no route
        beyond the bridge's own subnet."""
        subnet = self.ensure()
        netns, veth = self.netns(nid), self.veth(nid)
        # Two `ip` processes (batches) instead of nine: sixteen nodes are plugged in at once.
        try:
            # eth0's MAC follows from its address, so that a node booted again (a stopped
            # instance started) keeps it, as a cloud's NIC does: the other nodes' ARP
            # entries for the address stay right (a new random MAC left them sending to
            # the old one until their entry went stale, and their mounts failed meanwhile).
            _run("ip", "-batch", "-", input_text=f"netns add {netns}\n"
                 f"link add {veth} master {self.bridge} up type veth peer name eth0 "
                 f"address {_mac_of(address)} netns {netns}\n")
            _run("ip", "-n", netns, "-batch", "-", input_text=f"addr add {address}/{subnet.prefixlen} dev eth0\n"
                 "link set eth0 up\nlink set lo up\n")
        except ProviderError:
            self.remove_port(nid)
            raise

    def remove_port(self, nid: str) -> None:
        kill_netns_processes(self.netns(nid))
        _run("ip", "link", "del", self.veth(nid), check=False)
        _run("ip", "netns", "del", self.netns(nid), check=False)

    # -- inventory and removal -------------------------------------------------------------
    def namespaces(self) -> list[str]:
        prefix = f"fleet-{self.key}-"
        with contextlib.suppress(OSError):
            return sorted(e for e in os.listdir(NETNS_DIR) if e.startswith(prefix))
        return []

    def links(self) -> list[str]:
        result = _run("ip", "-j", "link", check=False)
        names = [link.get("ifname", "") for link in json.loads(result.stdout or "[]")]
        return sorted(n for n in names if n == self.bridge or n.startswith((self.veth_prefix, f"fp{self.key}")))

    def tables(self) -> list[str]:
        result = _run("nft", "list", "tables", check=False)
        return [line.strip() for line in result.stdout.splitlines() if line.strip().endswith(f" {self.table}")]

    def leftovers(self) -> dict[str, list[str]]:
        return {"namespaces": self.namespaces(), "links": self.links(), "nft_tables": self.tables()}

    def remove(self) -> list[str]:
        """Delete everything of this fleet's network: the processes in its namespaces,
        the namespaces, veths, the bridge, the nftables tables. Idempotent."""
        removed = []
        for netns in self.namespaces():
            kill_netns_processes(netns)
            _run("ip", "netns", "del", netns, check=False)
            removed.append(f"network namespace {netns}")
        for link in self.links():
            if _run("ip", "link", "del", link, check=False).returncode == 0:
                removed.append(f"{'bridge' if link == self.bridge else 'veth'} {link}")
        for table in self.tables():
            if _run("nft", "delete", "table", *table.split()[1:], check=False).returncode == 0:
                removed.append(f"nftables {table}")
        self.lock.unlink(missing_ok=True)
        (LOCK_DIR / f"{self.key}.policy.lock").unlink(missing_ok=True)
        return removed


def local_default_policy(subnet: ipaddress.IPv4Network, network: FleetNetwork) -> str:
    """The local provider's VPC-like default: nodes reach each other on every port, the
    caller (the bridge's host side) reaches the nodes' SSH, nothing else opens a
    connection."""
    host = subnet.network_address + 1
    nodes = f"{host + 1}-{subnet.broadcast_address - 1}"
    return render_tables(network, [
        Rule(sources=(nodes,), targets=(nodes,), protocol="all", name="fleet-internal"),
        Rule(sources=(str(host),), targets=(nodes,), protocol="tcp", ports=("22",), name="fleet-ssh"),
    ])


def _mac_of(address: str) -> str:
    """A locally administered unicast MAC (02:fa:...) made of an IPv4 address."""
    return "02:fa:" + ":".join(f"{int(part):02x}" for part in address.split("."))


def kill_netns_processes(netns: str) -> None:
    """SIGKILL every process in a network namespace (a node's unshare, its init and so
    every process of its PID namespace), and wait until they are gone."""
    for _ in range(50):
        result = _run("ip", "netns", "pids", netns, check=False)
        pids = [int(p) for p in result.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


# -- the node's boot ----------------------------------------------------------------------
BOOT_SCRIPT = r"""#!/bin/bash
# init of an isolated fleet node (pid 1 of its PID namespace). Rendered by
# fleet.providers.localns: every value is shell-quoted.
set -eu
NODE={node_dir}
NEWROOT="$NODE/root"
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=/,upperdir=$NODE/upper,workdir=$NODE/work" "$NEWROOT"
# The node's own disk for what a machine image does not share: home directories, /tmp, /work.
# (Few processes: sixteen nodes boot at once on a laptop's cores.)
OWN="root home tmp var/tmp work"
mkdir -p $(for dir in $OWN; do printf '%s\n' "$NODE/disk/$dir" "$NEWROOT/$dir"; done) \
  "$NEWROOT/proc" "$NEWROOT/sys" "$NEWROOT/run" "$NEWROOT/dev"
for dir in $OWN; do
  mount --bind "$NODE/disk/$dir" "$NEWROOT/$dir"
done
chmod 1777 "$NODE/disk/tmp" "$NODE/disk/var/tmp"
chmod 700 "$NODE/disk/root"
# The data disk a head has attached (a directory outside the node's, which outlives it).
DATA={data_dir}
if [ -n "$DATA" ]; then
  mkdir -p "$DATA" "$NEWROOT"{data_mount}
  mount --bind "$DATA" "$NEWROOT"{data_mount}
fi
# What of the laptop lies outside those: the control plane's checkout, virtualenv, state.
for hidden in {hidden}; do
  if [ -n "$hidden" ] && [ -d "$NEWROOT$hidden" ]; then mount -t tmpfs -o ro,size=4k,mode=0755 fleet-hidden "$NEWROOT$hidden"; fi
done
mount -t proc proc "$NEWROOT/proc"
mount -t sysfs -o ro sysfs "$NEWROOT/sys" 2>/dev/null || true
mount -t tmpfs -o mode=0755,size=64m run "$NEWROOT/run"
mount -t tmpfs -o mode=0755,size=1m dev "$NEWROOT/dev"
mkdir -p "$NEWROOT/dev/pts" "$NEWROOT/dev/shm" "$NEWROOT/run/fleet-console" "$NEWROOT/run/fleet-init/bin"
for device in null zero full random urandom tty fuse; do
  if [ -e "/dev/$device" ]; then : > "$NEWROOT/dev/$device"; mount --bind "/dev/$device" "$NEWROOT/dev/$device"; fi
done
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$NEWROOT/dev/pts"
ln -s pts/ptmx "$NEWROOT/dev/ptmx"
mount -t tmpfs -o mode=1777,size=256m shm "$NEWROOT/dev/shm"
mount --bind "$NODE/console" "$NEWROOT/run/fleet-console"
hostname {name}
cd "$NEWROOT"
mkdir -p .fleet-oldroot
pivot_root . .fleet-oldroot
cd /
umount -l /.fleet-oldroot
rmdir /.fleet-oldroot
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
CONSOLE=/run/fleet-console
# A fresh machine's own host key, never the image's (the host's): gone before anything
# runs. A node booted again (a stopped one started) keeps the key it made, as a cloud's does.
[ -f /etc/ssh/.fleet-node-host-key ] || rm -f /etc/ssh/ssh_host_*
# This init manages sshd, as systemd does on a cloud image: it starts it after the
# startup script, with the config the script left. A script's `systemctl restart ssh`
# or `service ssh restart` is answered here instead of starting a second sshd.
for manager in systemctl service; do
  printf '#!/bin/sh\necho "fleet node init: $0 $*: sshd starts after the startup script" >&2\nexit 0\n' \
    > "/run/fleet-init/bin/$manager"
done
chmod 755 /run/fleet-init/bin/systemctl /run/fleet-init/bin/service
export TZ=UTC
printf '%(%FT%TZ)T startup script begins\n' -1 >> "$CONSOLE/boot.log"
set +e
PATH="/run/fleet-init/bin:$PATH" /bin/bash "$CONSOLE/startup.sh" >> "$CONSOLE/startup.log" 2>&1
echo $? > "$CONSOLE/startup.rc"
set -e
printf '%(%FT%TZ)T startup script ended with %s\n' -1 "$(< "$CONSOLE/startup.rc")" >> "$CONSOLE/boot.log"
# A key the startup script installed (a host key the cloud vouches for) is kept.
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -C {name} -f /etc/ssh/ssh_host_ed25519_key
touch /etc/ssh/.fleet-node-host-key
cp /etc/ssh/ssh_host_ed25519_key.pub "$CONSOLE/host_key.pub.tmp"
mv "$CONSOLE/host_key.pub.tmp" "$CONSOLE/host_key.pub"
mkdir -p /run/sshd
chmod 0755 /run/sshd
/usr/sbin/sshd -E "$CONSOLE/sshd.log" \
  -o HostKey=/etc/ssh/ssh_host_ed25519_key -o PidFile=/run/sshd.pid -o UsePAM=no \
  -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o PermitRootLogin=prohibit-password \
  -o MaxStartups=200:30:400 -o MaxSessions=64 -o ClientAliveInterval=15 -o ClientAliveCountMax=3 \
  -o PrintMotd=no -o X11Forwarding=no
printf '%(%FT%TZ)T sshd started\n' -1 >> "$CONSOLE/boot.log"
touch "$CONSOLE/booted"
trap 'exit 0' TERM
# pid 1 reaps what is orphaned inside the node (bash reaps every child it is sent SIGCHLD for).
while :; do sleep 3600 & wait $! || true; done
"""


def hidden_paths(extra: Iterable[str | Path]) -> list[str]:
    """Paths of the control plane to mask inside a node (beyond /root, /home, /tmp, /work,
    which a node has of its own): its checkout, its virtualenv, and `extra`."""
    candidates = [Path(fleet_package.__file__).resolve().parents[1], Path(sys.prefix).resolve(),
                  Path(sys.executable).resolve().parent, *(Path(p).resolve() for p in extra)]
    own = ("/root", "/home", "/tmp", "/var/tmp", "/work")
    keep = ("/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc", "/opt", "/proc", "/sys", "/dev", "/run")
    hidden = []
    for path in candidates:
        text = str(path)
        if text == "/" or any(text == k or text.startswith(k + "/") for k in own):
            continue
        if any(text == k for k in keep):
            continue
        hidden.append(text)
    return sorted(set(hidden))


def render_boot_script(node_dir: Path, name: str, hidden: Iterable[str], data_dir: str = "") -> str:
    return BOOT_SCRIPT.format(node_dir=shlex.quote(str(node_dir)), name=shlex.quote(name),
                              hidden=" ".join(shlex.quote(h) for h in hidden) or "''",
                              data_dir=shlex.quote(data_dir), data_mount=shlex.quote(DATA_MOUNT))


@dataclass
class IsolatedNode(LocalNode):
    """A local node in namespaces of its own (see the module docstring). Same record
    (`node.json`) and verbs as a loopback `LocalNode`; `list()` loads either."""

    nid: str = ""  # names its netns and veth, unique within the fleet
    init_pid: int = 0  # host pid of the node's init (pid 1 inside)
    starter_pid: int = 0  # host pid of the `unshare` that waits for the init

    @property
    def network(self) -> FleetNetwork:
        return FleetNetwork.of(self.dir.parent.parent, self.fleet)

    @property
    def console(self) -> Path:
        """What the node and the provider share: the boot log, the startup script's log
        and exit status, the node's public host key."""
        return self.dir / "console"

    @property
    def host_key_path(self) -> Path:
        return self.console / "host_key.pub"

    @property
    def sshd_log(self) -> Path:
        return self.console / "sshd.log"

    @property
    def home(self) -> Path:
        """The SSH user's home on the node's own disk, as this machine sees it (/root for
        root, else /home/<user>, where the startup script's useradd makes it)."""
        return self.dir / "disk" / ("root" if self.user == "root" else f"home/{self.user}")

    def host_path(self, path: str) -> Path:
        """`path` of the running node as this machine reaches it: under its init's root,
        with the node's symlinks resolved inside the node (an absolute link target is the
        node's /, not ours; e.g. a head's `shared`, a link into its share chroot)."""
        root = Path(f"/proc/{self.init_pid}/root")
        parts = [p for p in path.split("/") if p]
        resolved: list[str] = []
        for _ in range(64):
            if not parts:
                return root.joinpath(*resolved)
            part = parts.pop(0)
            if part in (".", ".."):
                resolved = resolved[:-1] if part == ".." else resolved
                continue
            candidate = root.joinpath(*resolved, part)
            if candidate.is_symlink():
                target = os.readlink(candidate)
                resolved = [] if target.startswith("/") else resolved
                parts = [p for p in target.split("/") if p] + parts
            else:
                resolved.append(part)
        raise ProviderError(f"local node {self.name}: too many symlinks in {path}")

    @classmethod
    def create_isolated(
        cls, root: Path, *, name: str, fleet: str, user: str, startup_script: str,
        labels: dict[str, str] | None = None, hidden: Iterable[str | Path] = (),
        boot_timeout: float = BOOT_TIMEOUT_S, data_dir: Path | None = None,
    ) -> IsolatedNode:
        """Create the node, boot it and wait until its sshd answers (or the boot fails).
        `data_dir` is its data disk, mounted at DATA_MOUNT inside."""
        node = cls.reserve(root, name=name, fleet=fleet, user=user, labels=labels)
        node.start(startup_script, hidden=hidden, boot_timeout=boot_timeout, data_dir=data_dir)
        return node

    @classmethod
    def reserve(cls, root: Path, *, name: str, fleet: str, user: str,
                labels: dict[str, str] | None = None) -> IsolatedNode:
        """The node's record and address, before it boots (a cloud's pending instance)."""
        require_namespaces()
        root = Path(root).resolve()
        node_dir = root / fleet / name
        network = FleetNetwork.of(root, fleet)
        with _locked(network.lock):
            if (node_dir / "node.json").exists():
                raise ProviderError(f"local node {name} already exists at {node_dir}")
            taken = [n.address for n in LocalNode.list(root, fleet)]
            address = network.allocate_address(taken)
            existing = {ns.rsplit("-", 1)[-1] for ns in network.namespaces()}
            nid = next(candidate for candidate in (os.urandom(2).hex() for _ in range(1000))
                       if candidate not in existing)
            node = cls(dir=node_dir, name=name, fleet=fleet, id=uuid.uuid4().hex, address=address, port=22,
                       user=user, labels=dict(labels or {}), created_at=time.time(), isolation="namespaces",
                       nid=nid)
            for sub in ("upper", "work", "root", "disk", "console"):
                (node_dir / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(node_dir, 0o700)
            node._save()
        return node

    def start(self, startup_script: str, *, hidden: Iterable[str | Path] = (),
              boot_timeout: float = BOOT_TIMEOUT_S, ssh_port: int = 22, data_dir: Path | None = None) -> None:
        """Plug the node into the bridge and boot it; destroy it when the boot fails."""
        try:
            self.network.add_port(self.nid, self.address)
            (self.console / "startup.sh").write_text(startup_script)
            if data_dir is not None:
                self.data_dir = str(Path(data_dir).resolve())
                Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            boot = self.dir / "boot.sh"
            boot.write_text(render_boot_script(self.dir, self.name, hidden_paths([self.dir.parent.parent, *hidden]),
                                               self.data_dir))
            self.port = ssh_port
            self._save()
            self._boot(boot, boot_timeout)
        except BaseException:
            self.destroy()
            raise

    def boot(self, *, boot_timeout: float = BOOT_TIMEOUT_S) -> None:
        """Boot a stopped node again (a cloud's instance start): the same disk (its
        overlay's upper layer, home directories, data disk), address and host key; the
        startup script runs again. Idempotent. A failed boot leaves the node stopped."""
        if self.is_running():
            return
        self.kill(preempted=False)  # what may be left of the last boot: its port, a stray init
        self.preempted = False
        self.init_pid = self.starter_pid = 0
        self._save()
        try:
            self.network.add_port(self.nid, self.address)
            self._boot(self.dir / "boot.sh", boot_timeout)
        except BaseException:
            self.kill(preempted=False)
            raise

    def _boot(self, boot: Path, timeout: float) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", MARKER: self.id, FLEET_MARKER: self.fleet,
               ROOT_MARKER: str(self.dir.parent.parent)}
        with open(self.dir / "boot.out", "ab") as out:
            starter = subprocess.Popen(
                [_which("nsenter") or "nsenter", f"--net={NETNS_DIR / self.network.netns(self.nid)}", "--",
                 _which("unshare") or "unshare", "--mount", "--pid", "--uts", "--fork", "--kill-child",
                 "--propagation", "private", "--", "/bin/bash", str(boot)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True, close_fds=True,
            )
        self.starter_pid = starter.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.init_pid:
                children = _children(starter.pid)
                if children:
                    self.init_pid = children[0]
                    self._save()
            if (self.console / "booted").exists():
                return
            if starter.poll() is not None:
                break
            time.sleep(0.02)
        else:
            raise ProviderError(f"local node {self.name} did not boot within {timeout:g}s: {self.boot_problem()}")
        raise ProviderError(f"local node {self.name} failed to boot: {self.boot_problem()}")

    def boot_problem(self) -> str:
        parts = []
        for log in (self.dir / "boot.out", self.console / "startup.log", self.console / "sshd.log"):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").strip()
                if text:
                    parts.append(f"{log.name}: {text[-300:]}")
        return "; ".join(parts) or "no output"

    def _record(self) -> dict[str, object]:
        return {**super()._record(), "nid": self.nid, "init_pid": self.init_pid, "starter_pid": self.starter_pid}

    # -- state -----------------------------------------------------------------------------
    def _netns_inode(self) -> int | None:
        with contextlib.suppress(OSError):
            return os.stat(NETNS_DIR / self.network.netns(self.nid)).st_ino
        return None

    def _init_alive(self) -> bool:
        if not self.init_pid or not _pid_alive(self.init_pid):
            return False
        try:
            return os.stat(f"/proc/{self.init_pid}/ns/net").st_ino == self._netns_inode()
        except OSError:
            return False

    def is_running(self) -> bool:
        return self._init_alive() and (self.console / "booted").exists()

    def processes(self) -> list[int]:
        """Every process of the node: whatever runs in its network namespace."""
        result = _run("ip", "netns", "pids", self.network.netns(self.nid), check=False)
        return sorted(int(p) for p in result.stdout.split() if p.isdigit() and _pid_alive(int(p)))

    def terminate(self, *, exclude_infrastructure: bool = True) -> list[int]:
        """SIGTERM the node's programs (not its init, sshd or sshfs), like an ACPI soft-off."""
        signalled = []
        for pid in self.processes():
            if pid in (self.init_pid, self.starter_pid):
                continue
            cmd = _cmdline_of(pid)
            program = os.path.basename(cmd.split(" ")[0]) if cmd else ""
            if exclude_infrastructure and (program.startswith(("sshd", "sshfs", "sftp-server"))
                                           or (cmd == "sleep 3600" and _parent(pid) == self.init_pid)):
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
        return signalled

    def kill(self, *, preempted: bool = True) -> None:
        """The node's init dies, and with it every process and mount of the node; then
        its network namespace and veth are deleted."""
        if preempted and self.dir.exists():
            self.preempted = True
            self._save()
        if self._init_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.init_pid, signal.SIGKILL)
        if self.nid:
            self.network.remove_port(self.nid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                pid and _pid_alive(pid) for pid in (self.init_pid, self.starter_pid)):
            time.sleep(0.02)
        (self.console / "booted").unlink(missing_ok=True)
        if self.dir.exists():
            self._save()

    def destroy(self) -> None:
        self.mark_deleting()
        self.kill(preempted=False)
        if not any(pid and _pid_alive(pid) for pid in (self.init_pid, self.starter_pid)):
            self.remove_dir()


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None

"""The prepared runtime tree: fleet's wheel unpacked once on the control plane, replayed
on nodes in the virtualenv layout a pilot node reported.

No fleet here: the node's side is plain shell and Python, run on this machine with
$HOME pointing at a scratch directory. What a node reports is checked before any other
node replays it; a tree cut short is not staged."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import venv
from concurrent.futures import Future
from pathlib import Path

import pytest

from fleet import __version__
from fleet.runtime import (
    FINGERPRINTED,
    NODE_ROOT,
    PTH,
    STAMP,
    ZIPPED,
    _Plan,
    _sha256,
    build_cache,
    build_tree,
    build_wheel,
    checked_layout,
    ensure_shell,
    fingerprint_of,
    fingerprint_shell,
    replay_payload,
    runtime_dir,
    staged_dir,
)
from fleet.runtime_node import layout as reported_layout
from fleet.ssh import Target

IMAGE = "/opt/img"
GOOD = {
    "site": "lib/python3.11/site-packages",
    "links": {"python": "python3.11", "python3": "python3.11", "python3.11": "/usr/bin/python3.11"},
    "lib64": "lib",
    "cfg": "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.2\nexecutable = /usr/bin/python3.11\n",
    "pth": f"{IMAGE}/lib/python3.11/site-packages\n",
}


@pytest.fixture(scope="module")
def tree() -> Path:
    return build_tree(build_wheel(build_cache()))


def test_a_pilots_layout_is_accepted_in_canonical_form() -> None:
    assert checked_layout(GOOD, [IMAGE]) == GOOD
    assert checked_layout({**GOOD, "pth": None, "lib64": None}, [])["pth"] is None  # type: ignore[index]


@pytest.mark.parametrize("change", [
    {"pth": "/home/u/shared/.fleet/evil\n"},  # a .pth that names the shared directory (or anything not the image)
    {"pth": "import os; os.system('x')\n"},  # a .pth line Python would execute
    {"pth": f"{IMAGE}/../../root/shared\n"},
    {"links": {"python": "../../../shared/python"}},
    {"links": {"python": "python3", "evil.sh": "/bin/sh"}},
    {"links": {"python3": "/usr/bin/python3"}},  # no `python`
    {"site": "lib/python3.11/../../../../shared"},
    {"lib64": "/shared"},
    {"cfg": GOOD["cfg"].replace("home = /usr/bin", "home = /home/u/shared")},  # the stdlib from elsewhere
    {"cfg": GOOD["cfg"].replace("false", "true")},
    {"cfg": GOOD["cfg"] + "command = /usr/bin/python3 -m venv /root/.fleet/runtime/x\n"},
    {"cfg": GOOD["cfg"].replace("/usr/bin/python3.11", "/usr/bin/python3 x")},
])
def test_a_layout_that_would_reach_beyond_the_runtime_is_refused(change: dict) -> None:
    assert checked_layout({**GOOD, **change}, [IMAGE]) is None
    assert checked_layout("not a layout", [IMAGE]) is None


def make_pilot_venv(home: Path) -> tuple[Path, dict]:
    """A runtime virtualenv as the pilot's runtime_node.py makes one (this machine's
    interpreter; its site-packages layered as the image), and the layout it reports."""
    root = home / runtime_dir()
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(str(root))
    purelib = next(root.glob("lib/python3.*/site-packages"))
    (purelib / "fleet-image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    found = reported_layout(root, purelib)
    assert found is not None
    return root, found


def run_shell(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=60, check=False)


def test_nodes_of_one_environment_share_a_fingerprint_and_another_image_changes_it(tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "lib/python3.11/site-packages/torch-2.13.0.dist-info").mkdir(parents=True)

    def fingerprint() -> tuple[str, str]:
        found = fingerprint_of(run_shell(fingerprint_shell(shlex.quote(sys.executable), [str(image)]),
                                         tmp_path).stdout.splitlines())
        assert found is not None
        return found[1], found[0]

    real, first = fingerprint()
    assert real == os.path.realpath(sys.executable) and len(first) == 64
    assert fingerprint()[1] == first
    (image / "lib/python3.11/site-packages/numpy-2.0.dist-info").mkdir()
    assert fingerprint()[1] != first
    # A node without the interpreter cannot tell its environment: it installs alone, in full.
    nothing = run_shell(fingerprint_shell("/no/such/python", [str(image)]), tmp_path)
    assert nothing.stdout == "" and fingerprint_of(nothing.stdout.splitlines()) is None


def run_shell_with(script: str, home: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                          input=data, capture_output=True, timeout=60, check=False)


def test_ensure_shell_checks_stages_and_replays_the_pilots_layout(tree: Path, tmp_path: Path) -> None:
    """One SSH operation per node: the check, and what the control plane sends on seeing
    its fingerprint: the tree and the pilot's layout at once, or the tree now and the
    layout in a later operation, or nothing."""
    pilot, found = make_pilot_venv(tmp_path / "pilot")
    layout = checked_layout(found, [sysconfig.get_paths()["purelib"]])
    assert layout is not None, found
    stamp = f"fleet-batch {__version__} wheel=test settings=test"
    data, sha = tree.read_bytes(), _sha256(tree)
    fingerprint = fingerprint_shell(shlex.quote(sys.executable), [sysconfig.get_paths()["purelib"]])
    script = ensure_shell(stamp, fingerprint, sha, len(data))
    payload = replay_payload(layout)

    at_once = tmp_path / "at-once"
    done = run_shell_with(script, at_once, b"stage\n" + data + payload)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and lines[0] == "absent" and lines[-1] == "installed", done
    assert fingerprint_of(lines[1:lines.index(FINGERPRINTED)])[1] == os.path.realpath(sys.executable)
    root = at_once / runtime_dir()
    assert (root / STAMP).read_text() == stamp + "\n"
    assert sorted(p.name for p in root.iterdir()) == sorted([p.name for p in pilot.iterdir()] + [STAMP])
    assert {p.name: os.readlink(p) for p in (root / "bin").iterdir() if p.is_symlink()} == layout["links"]
    assert not list((at_once / NODE_ROOT).glob(".staged-*"))  # the staging became the runtime
    # fleet comes from the tree (zipped), its dependencies from the layered "image", and
    # the console script starts the runtime's own interpreter.
    clean = {"HOME": str(at_once), "PATH": os.environ["PATH"]}
    code = "import sys, fleet, yaml; print(sys.prefix, fleet.__file__)"
    where = subprocess.run([str(root / "bin" / "python"), "-P", "-c", code], env=clean, capture_output=True,
                           text=True, check=True)
    prefix, fleet_file = where.stdout.split()
    assert prefix == str(root) and fleet_file == str(root / layout["site"] / ZIPPED / "fleet" / "__init__.py")
    worker = subprocess.run([str(root / "bin" / "fleet-worker"), "--help"], env=clean, capture_output=True,
                            text=True, check=False)
    assert worker.returncode == 0 and "JOB_DIR" in worker.stdout, worker.stderr
    # A complete node: `present`, and its stdin is not read.
    again = run_shell_with(script, at_once, b"")
    assert again.returncode == 0 and again.stdout == b"present\n", again

    later = tmp_path / "later"
    nothing = run_shell_with(script, later, b"")  # left for its own pilot
    assert nothing.returncode == 6 and nothing.stdout.split()[-1] == b"unstaged", nothing
    assert run_shell_with(script, later, b"replay\n" + payload).stdout.split()[-1] == b"unstaged"  # nothing staged
    staged = run_shell_with(script, later, b"stage\n" + data)
    assert staged.returncode == 6 and staged.stdout.split()[-1] == b"staged", staged
    assert not (later / runtime_dir()).exists() and (later / staged_dir(sha) / "site-packages").is_dir()
    # A layout whose interpreter is not this node's own: nothing is made (the full install follows).
    other = {**layout, "cfg": "home = /bin\ninclude-system-site-packages = false\nexecutable = /bin/true\n"}
    changed = run_shell_with(script, later, b"replay\n" + replay_payload(other))
    assert changed.returncode == 5 and not (later / runtime_dir()).exists(), changed
    made = run_shell_with(script, later, b"replay\n" + payload)
    assert made.returncode == 0, made
    assert sorted(p.name for p in (later / runtime_dir()).iterdir()) == sorted(p.name for p in root.iterdir())

    cut = tmp_path / "cut"
    short = run_shell_with(script, cut, b"stage\n" + data[: len(data) // 2])
    assert short.returncode == 6 and short.stdout.split()[-1] == b"unstaged", short
    assert not (cut / staged_dir(sha)).exists() and not (cut / runtime_dir()).exists()


def test_the_replay_payload_carries_only_the_checked_layout() -> None:
    payload = replay_payload(GOOD)
    lines = payload.split(b"\n", 4)
    assert lines[:3] == [b"lib/python3.11/site-packages", b"1", b"/usr/bin/python3.11"]
    size = int(lines[3])
    with tarfile.open(fileobj=io.BytesIO(lines[4][:size])) as skeleton:
        names = {m.name: m for m in skeleton.getmembers()}
    assert set(names) == {"bin", "include", "lib", "lib/python3.11", "bin/python", "bin/python3", "bin/python3.11",
                          "lib64", "pyvenv.cfg", f"site-packages/{PTH}"}
    assert all(not m.issym() or m.linkname in ("python3.11", "/usr/bin/python3.11", "lib") for m in names.values())
    assert len(lines[4]) == size


class _Layouts:
    """The part of Runtime a plan reads: the stored layout of an environment."""

    def __init__(self, known: dict[str, dict]) -> None:
        self.known = known

    def stored_layout(self, stamp: str, fingerprint: str) -> dict | None:
        return self.known.get(fingerprint)


def _report(plan: _Plan, node: str, interpreter: str) -> None:
    for line in ["absent", interpreter, f"listing of {interpreter}", FINGERPRINTED]:
        plan.on_line(node, "stdout", line)


def _sent(plan: _Plan, node: str) -> list[bytes]:
    return list(plan.stdin(Target(name=node, address="127.0.0.1", port=22, user="u")))


def test_a_plan_sends_each_node_what_its_environment_allows() -> None:
    known_key = fingerprint_of(["/usr/bin/python3.11", "listing of /usr/bin/python3.11"])
    pilot_key = fingerprint_of(["/opt/py/bin/python3.11", "listing of /opt/py/bin/python3.11"])
    assert known_key and pilot_key
    payload: Future[bytes] = Future()
    plan = _Plan(_Layouts({known_key[0]: GOOD}), "stamp", b"TREE", pilot=pilot_key, payload=payload, hold=1,
                 staged={"staged-known"})
    plan.on_line("complete", "stdout", "present")
    _report(plan, "known", "/usr/bin/python3.11")
    _report(plan, "staged-known", "/usr/bin/python3.11")
    _report(plan, "waits", "/opt/py/bin/python3.11")
    _report(plan, "only-stages", "/opt/py/bin/python3.11")  # beyond `hold`
    _report(plan, "first-other", "/other/python")
    _report(plan, "second-other", "/other/python")
    assert _sent(plan, "complete") == []
    assert _sent(plan, "known") == [b"stage\n", b"TREE", replay_payload(GOOD)]
    assert _sent(plan, "staged-known") == [b"replay\n", replay_payload(GOOD)]
    assert _sent(plan, "only-stages") == [b"stage\n", b"TREE"]
    assert _sent(plan, "first-other") == []  # left for its own pilot
    assert _sent(plan, "second-other") == [b"stage\n", b"TREE"]
    waiting = plan.stdin(Target(name="waits", address="127.0.0.1", port=22, user="u"))
    assert next(waiting) == b"stage\n" and next(waiting) == b"TREE"
    payload.set_result(b"the pilot's layout")
    assert list(waiting) == [b"the pilot's layout"]
    # A node that never reported (unreachable) gets nothing once the operation is over.
    silent = plan.stdin(Target(name="silent", address="127.0.0.1", port=22, user="u"))
    plan.release()
    assert list(silent) == [] and _sent(plan, "later") == []

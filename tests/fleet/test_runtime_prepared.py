"""The prepared runtime tree: fleet's wheel unpacked once on the control plane, replayed
on nodes in the virtualenv layout a pilot node reported.

No fleet here: the node's side is plain shell and Python, run on this machine with
$HOME pointing at a scratch directory. What a node reports is checked before any other
node replays it; the tree is refused when its sha256 is not the one sent over SSH."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest

from fleet import __version__
from fleet.runtime import (
    NODE_ROOT,
    PTH,
    STAMP,
    TREE,
    _sha256,
    build_cache,
    build_tree,
    build_wheel,
    checked_layout,
    fingerprint_of,
    fingerprint_shell,
    layout_tree,
    prepared_shell,
    replay_payload,
    replay_shell,
    runtime_dir,
    stage_shell,
    staged_dir,
)
from fleet.runtime_node import layout as reported_layout

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


def test_the_prepared_tree_makes_a_working_runtime_and_a_swapped_one_is_refused(tree: Path, tmp_path: Path) -> None:
    pilot, found = make_pilot_venv(tmp_path / "pilot")
    image = [sysconfig.get_paths()["purelib"]]
    layout = checked_layout(found, image)
    assert layout is not None, found
    prepared = layout_tree(tree, layout)
    assert layout_tree(tree, layout) == prepared  # built once per layout
    real = os.path.realpath(sys.executable)
    stamp = f"fleet-batch {__version__} wheel=test settings=test"
    incoming = f"{NODE_ROOT}/.incoming-{__version__}"
    script = prepared_shell(layout, real, stamp, incoming, _sha256(prepared))

    # A tree that is not the one whose hash came with the command is not unpacked.
    home = tmp_path / "node"
    (home / incoming).mkdir(parents=True)
    with tarfile.open(home / incoming / TREE, "w") as swapped:
        swapped.add(tree, f"{__version__}/lib/evil.py")
    refused = run_shell(script, home)
    assert refused.returncode == 1 and "does not match its sha256" in refused.stdout, refused
    assert not (home / runtime_dir()).exists()

    # An interpreter the layout names that is not this node's own: back to the full install.
    other = run_shell(prepared_shell(layout, "/usr/bin/not-this-one", stamp, incoming, _sha256(prepared)), home)
    assert other.returncode == 5 and not (home / runtime_dir()).exists(), other

    (home / incoming / TREE).write_bytes(prepared.read_bytes())
    done = run_shell(script, home)
    assert done.returncode == 0, done
    root = home / runtime_dir()
    assert (root / STAMP).read_text() == stamp + "\n"
    assert sorted(p.name for p in root.iterdir()) == sorted([p.name for p in pilot.iterdir()] + [STAMP])
    # fleet comes from the tree, its dependencies from the layered "image", and the
    # console script starts the runtime's own interpreter.
    clean = {"HOME": str(home), "PATH": os.environ["PATH"]}
    code = "import sys, fleet, yaml; print(sys.prefix, fleet.__file__)"
    where = subprocess.run([str(root / "bin" / "python"), "-P", "-c", code], env=clean, capture_output=True,
                           text=True, check=True)
    prefix, fleet_file = where.stdout.split()
    assert prefix == str(root) and fleet_file.startswith(str(root / layout["site"] / "fleet")), where.stdout
    worker = subprocess.run([str(root / "bin" / "fleet-worker"), "--help"], env=clean, capture_output=True,
                            text=True, check=False)
    assert worker.returncode == 0 and "JOB_DIR" in worker.stdout, worker.stderr


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


def runtime_listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) + ("@" + os.readlink(p) if p.is_symlink() else "")
                  for p in root.rglob("*") if "__pycache__" not in p.parts)


def test_a_staged_tree_becomes_the_pilots_runtime_on_the_same_channel_or_a_later_one(tree: Path, tmp_path: Path) -> None:
    """The nodes that wait for a pilot stage the tree (stage_shell), then make the runtime
    from the layout that comes on the same stdin; a node whose stdin ends after the tree
    stays staged, and a later replay_shell makes it."""
    pilot, found = make_pilot_venv(tmp_path / "pilot")
    layout = checked_layout(found, [sysconfig.get_paths()["purelib"]])
    assert layout is not None, found
    real = os.path.realpath(sys.executable)
    stamp = f"fleet-batch {__version__} wheel=test settings=test"
    data, sha = tree.read_bytes(), _sha256(tree)
    payload = replay_payload(layout)
    # What the pilot's virtualenv has, beside fleet's tree, unpacked the same way.
    expected = tmp_path / "expected"
    prepared = layout_tree(tree, layout)
    (expected / ".fleet/runtime").mkdir(parents=True)
    with tarfile.open(prepared) as archive:
        archive.extractall(expected / ".fleet/runtime", filter="tar")

    at_once = tmp_path / "at-once"
    done = run_shell_with(stage_shell(sha, len(data), real, stamp), at_once, data + payload)
    assert done.returncode == 0, done
    root = at_once / runtime_dir()
    assert (root / STAMP).read_text() == stamp + "\n"
    assert runtime_listing(root) == sorted([*runtime_listing(expected / runtime_dir()), STAMP])
    assert sorted(p.name for p in root.iterdir()) == sorted([p.name for p in pilot.iterdir()] + [STAMP])
    assert not list((at_once / NODE_ROOT).glob(".staged-*"))  # the staging became the runtime
    clean = {"HOME": str(at_once), "PATH": os.environ["PATH"]}
    worker = subprocess.run([str(root / "bin" / "fleet-worker"), "--help"], env=clean, capture_output=True,
                            text=True, check=False)
    assert worker.returncode == 0 and "JOB_DIR" in worker.stdout, worker.stderr

    later = tmp_path / "later"
    assert run_shell_with(replay_shell(real, stamp, sha), later, payload).returncode == 7  # nothing staged yet
    staged = run_shell_with(stage_shell(sha, len(data), real, stamp), later, data)
    assert staged.returncode == 6 and staged.stdout.strip() == b"staged", staged
    assert not (later / runtime_dir()).exists() and (later / staged_dir(sha) / "site-packages").is_dir()
    # An interpreter the layout names that is not this node's own: nothing is made.
    other = run_shell_with(replay_shell("/usr/bin/not-this-one", stamp, sha), later, payload)
    assert other.returncode == 5 and not (later / runtime_dir()).exists(), other
    made = run_shell_with(replay_shell(real, stamp, sha), later, payload)
    assert made.returncode == 0, made
    assert runtime_listing(later / runtime_dir()) == runtime_listing(root)


def test_a_tree_cut_short_is_not_staged(tree: Path, tmp_path: Path) -> None:
    data, sha = tree.read_bytes(), _sha256(tree)
    cut = run_shell_with(stage_shell(sha, len(data), sys.executable, "stamp"), tmp_path, data[: len(data) // 2])
    assert cut.returncode != 0 and cut.returncode not in (5, 6), cut
    assert not (tmp_path / staged_dir(sha)).exists() and not (tmp_path / runtime_dir()).exists()


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

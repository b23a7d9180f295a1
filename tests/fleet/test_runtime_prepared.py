"""The prepared runtime tree: fleet's wheel unpacked once on the control plane, replayed
on nodes in the virtualenv layout a pilot node reported.

No fleet here: the node's side is plain shell and Python, run on this machine with
$HOME pointing at a scratch directory. What a node reports is checked before any other
node replays it; the tree is refused when its sha256 is not the one sent over SSH."""

from __future__ import annotations

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
    STAMP,
    TREE,
    _sha256,
    build_cache,
    build_tree,
    build_wheel,
    checked_layout,
    fingerprint_shell,
    layout_tree,
    prepared_shell,
    runtime_dir,
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
    with tarfile.open(home / incoming / TREE, "w:gz") as swapped:
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
        script = f'{fingerprint_shell(shlex.quote(sys.executable), [str(image)])}; echo "$real"; echo "$fp"'
        real, digest = run_shell(script, tmp_path).stdout.split()
        return real, digest

    real, first = fingerprint()
    assert real == os.path.realpath(sys.executable) and len(first) == 64
    assert fingerprint()[1] == first
    (image / "lib/python3.11/site-packages/numpy-2.0.dist-info").mkdir()
    assert fingerprint()[1] != first

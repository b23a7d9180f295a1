"""The node side of fleet's runtime: makes `~/.fleet/runtime/<version>/` on a node.

Uploaded by `fleet.runtime` over SSH (never through the shared directory) as the
`__main__.py` of a zip bundle that also holds its config, the tree the control plane
prepared from fleet's wheel, and pypa's `packaging`, and run with the node's interpreter
on the first node of each environment (the pilot; the others unpack the same tree in
shell, into the layout this reports); it imports only the standard library and
`packaging`. Never imported by the control plane.

    python3 runtime.pyz [--inside]

1. Unless the stamp `fleet-runtime.id` says the runtime is complete, the virtualenv is
   made anew (`venv --without-pip`) with the image's interpreter, and a `.pth` file
   layers the image's site-packages under it: the image's torch is used, not copied.
2. fleet's tree goes in (its wheel unpacked by the control plane, no dependencies):
   nodes need only what the worker needs, never the control plane's cloud SDKs.
3. The requirements of the chosen extras and `packages` are checked against what the
   runtime sees (the image included); only the missing ones are installed, with every
   distribution of the image pinned at its version (pip never replaces the image's
   torch). From the index, or from the head's wheelhouse: `--no-index --find-links`
   and `--require-hashes` against pins the control plane sent over SSH.
4. The stamp is written last. The last line printed is one JSON object; on success it
   carries the virtualenv's layout (links, pyvenv.cfg, the image's .pth), which the
   control plane checks and replays on the other nodes of this environment.
Exit codes: 0 done, 3 requirements missing and no wheelhouse given yet (the control
plane fills it and calls again), 4 requirements missing and no pip here yet (the control
plane uploads its own, zipped, and calls again), 1 anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

STAMP = "fleet-runtime.id"
PTH = "fleet-image.pth"
TREE = "tree.tar"
TAIL_LINES = 25


def _expand(path: str) -> Path:
    """A path of the config: relative ones are under $HOME."""
    path = os.path.expanduser(path)
    return Path(path if os.path.isabs(path) else os.path.join(os.environ["HOME"], path))


def _site_packages_of(entry: str) -> list[str]:
    """The site-packages of an image entry: a prefix/venv (it has bin/python) or a
    site-packages directory itself."""
    python = Path(entry) / "bin" / "python"
    if python.exists():
        out = subprocess.run([str(python), "-c", "import site, sys; print('\\n'.join(site.getsitepackages()))"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        return [line for line in out.splitlines() if line.strip() and os.path.isdir(line)]
    return [entry] if os.path.isdir(entry) else []


def _fail(message: str, **extra: object) -> None:
    print(json.dumps({"status": "failed", "error": message, **extra}))
    sys.exit(1)


def _pip_tail(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def outside(config: dict, bundle: Path) -> None:
    """Run by the node's interpreter: (re)make the virtualenv, then continue inside it."""
    root = _expand(config["root"])
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text().strip() == config["stamp"]:
        print(json.dumps({"status": "present"}))
        return
    image = [str(entry) for entry in config.get("image", [])]
    missing_image = [entry for entry in image if not os.path.exists(entry)]
    if missing_image:
        _fail(f"the image path(s) {', '.join(missing_image)} named in runtime.image do not exist on this node")
    if root.exists():
        shutil.rmtree(root)  # another build of this version, or a half-made one
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(str(root))
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    with zipfile.ZipFile(bundle) as archive:
        archive.extract(TREE, bundle.parent)
    _unpack_tree(bundle.parent / TREE, config["tree_sha"], root, Path(purelib))
    site_dirs: list[str] = []
    for entry in image:
        site_dirs.extend(_site_packages_of(entry))
    if site_dirs:
        Path(purelib, PTH).write_text("".join(f"{d}\n" for d in site_dirs))
    os.execv(str(python), [str(python), str(bundle), "--inside"])


def _unpack_tree(tree: Path, sha: str, root: Path, purelib: Path) -> None:
    """The control plane's prepared tree, checked against the hash it sent, into the
    fresh virtualenv: `site-packages/` becomes its purelib, `bin/` joins its bin."""
    if hashlib.sha256(tree.read_bytes()).hexdigest() != sha:
        _fail("fleet's prepared runtime tree does not match its sha256")
    staging = root / ".tree"
    with tarfile.open(tree) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(staging, filter="data")
        else:  # a Python without extraction filters: the archive is ours and hash-checked
            archive.extractall(staging)
    purelib.rmdir()  # venv made it empty
    os.rename(staging / "site-packages", purelib)
    for script in (staging / "bin").iterdir():
        os.rename(script, root / "bin" / script.name)
    shutil.rmtree(staging)


def layout(root: Path, purelib: Path) -> dict | None:
    """What the other nodes of this environment replay: the venv's links, its
    pyvenv.cfg (without `command`, which names this node's path) and the image's .pth.
    None when something in it depends on where this runtime is."""
    links = {p.name: os.readlink(p) for p in sorted((root / "bin").iterdir()) if p.is_symlink()}
    lib64 = root / "lib64"
    cfg = "".join(line for line in (root / "pyvenv.cfg").read_text().splitlines(keepends=True)
                  if not line.startswith("command"))
    pth = purelib / PTH
    found = {"site": str(purelib.relative_to(root)), "links": links,
             "lib64": os.readlink(lib64) if lib64.is_symlink() else None,
             "cfg": cfg, "pth": pth.read_text() if pth.is_file() else None}
    return None if str(root) in json.dumps(found) else found


def _missing(requirements: list[str], extras: list[str]) -> list[str]:
    """The requirements (of the chosen extras, or given as packages) that nothing the
    runtime sees satisfies, as pip arguments (markers evaluated here, then dropped)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for line in requirements:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": e}) for e in ["", *extras]):
            continue
        requirement.marker = None
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            missing.append(str(requirement))
    return missing


def _image_pins(root: Path) -> list[str]:
    """name==version of every distribution the image layers under the runtime."""
    from importlib import metadata

    pth = [p for p in root.glob(f"lib/python*/site-packages/{PTH}")]
    dirs = [line.strip() for p in pth for line in p.read_text().splitlines() if line.strip()]
    pins = {}
    for dist in metadata.distributions(path=dirs):
        name = dist.metadata["Name"]
        if name and name.lower() not in pins:
            pins[name.lower()] = f"{name}=={dist.version}"
    return sorted(pins.values())


def _environment() -> dict:
    import sysconfig

    from packaging.markers import default_environment
    from packaging.tags import sys_tags

    tags = [str(tag) for tag in list(sys_tags())[:400]]
    return {"markers": default_environment(), "tags": tags, "platform": sysconfig.get_platform()}


def inside(config: dict, bundle: Path) -> None:
    """Run by the runtime's interpreter: fleet's wheel, what is missing, the stamp."""
    root = _expand(config["root"])
    incoming = bundle.parent
    missing = _missing(config.get("requirements", []), config.get("extras", []))
    pip_zip = incoming / config["pip"]
    pip = [sys.executable, str(pip_zip / "pip"), "install", "--no-compile",
           "--disable-pip-version-check", "--no-input", "--no-warn-script-location"]
    if missing:
        house = config.get("wheelhouse")
        constraints = incoming / "image-constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in _image_pins(root)))
        if house is None and config.get("need_wheelhouse"):
            print(json.dumps({"status": "missing", "missing": missing, "environment": _environment(),
                              "provided": _image_pins(root)}))
            sys.exit(3)
        if not pip_zip.is_file():
            print(json.dumps({"status": "need-pip", "missing": missing}))
            sys.exit(4)
        if house is not None:
            pinned = incoming / "wheelhouse-requirements.txt"
            pinned.write_text("".join(f"{line}\n" for line in house["pins"]))
            args = ["--no-index", "--find-links", str(_expand(house["dir"])), "--require-hashes", "--no-deps",
                    "-r", str(pinned)]
        else:
            args = [*config.get("index_options", []), "-c", str(constraints), *missing]
        result = subprocess.run([*pip, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            _fail(f"pip could not install {', '.join(missing)}", tail=_pip_tail(result))
        still = _missing(config.get("requirements", []), config.get("extras", []))
        if still:
            _fail(f"still missing after pip: {', '.join(still)}")
    (root / STAMP).write_text(config["stamp"] + "\n")
    import sysconfig

    purelib = Path(sysconfig.get_paths()["purelib"])
    print(json.dumps({"status": "installed", "installed": missing, "layout": layout(root, purelib)}))


def main() -> None:
    bundle = Path(sys.argv[0]).resolve()
    with zipfile.ZipFile(bundle) as archive:
        config = json.loads(archive.read("config.json"))
    try:
        if "--inside" in sys.argv[1:]:
            inside(config, bundle)
        else:
            outside(config, bundle)
    except subprocess.CalledProcessError as error:
        _fail(f"{' '.join(map(str, error.cmd))[:200]} failed", tail=(error.stdout or "") + (error.stderr or ""))
    except OSError as error:
        _fail(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main()

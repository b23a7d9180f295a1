"""fleet puts itself on every node: the runtime, a versioned virtualenv per node.

`fleet up` (and every replacement, before `setup:`) makes sure each node has
`~/.fleet/runtime/<version>/`: fleet's own wheel, built once per source digest on the
control plane and unpacked there once (pypa's `installer`) into a prepared tree, its
package zipped (a runtime is about 25 files), cached under `~/.cache/fleet/runtime/`.

Each node gets one SSH operation (ensure_shell): a complete runtime's stamp is left
alone, pip never runs. A node without it reports a fingerprint of its environment
(interpreter, image contents), and the control plane decides what the same channel's
stdin gets as the report arrives (_Plan). The first node of each fingerprint (the pilot)
gets `fleet/runtime_node.py` in one zip with the tree and does the full job in Python
(virtualenv, requirements, pip if something is missing), and reports the venv's layout,
checked here. Every other node of that fingerprint unpacks the layout-independent tree
into a staging directory meanwhile and waits on its channel for the layout; with it,
two renames make the runtime (no Python, no pip). A node whose layout is known already
gets the tree and the layout at once. Everything comes from this machine over SSH, never
through the shared directory.

Nodes get only what the chosen extras need (never the control plane's cloud SDKs),
layered on what the image provides (`runtime.image`). With `runtime.wheelhouse` the
control plane downloads what the image lacks once, for the nodes' platform, puts it in
the head's shared directory, and every node installs it from there with `--no-index
--require-hashes`, against pins that travel over SSH, never through the shared directory
(workers can write there).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from fleet import __version__
from fleet.errors import FleetError, UsageError
from fleet.model import Node, Role
from fleet.ssh import CommandResult, GroupResult, Target
from fleet.ssh.quote import receive_files

if TYPE_CHECKING:
    from fleet.fleetops import Fleet, UpResult

DIST = "fleet-batch"
NODE_ROOT = ".fleet/runtime"  # under each node's home
STAMP = "fleet-runtime.id"
LOCAL_IMAGE = "/opt/fleet-image"
WHEELHOUSE = ".fleet/wheelhouse"  # under the head's shared directory
TREE = "tree.tar"  # uncompressed: what it holds is mostly the zip, compressed already
PTH = "fleet-image.pth"  # the image's site-packages, layered under the runtime
ZIPPED = "fleet.zip"  # fleet's package in the runtime's site-packages
ZIPPED_PTH = "fleet-batch.pth"  # puts ZIPPED on sys.path (before the image's: b < i)
LAYOUTS = "layouts"  # under the cache: what each node fingerprint's pilot reported
_NODE_SCRIPT = Path(__file__).with_name("runtime_node.py")
_SOURCE_FILES = ("pyproject.toml", "README.md")


class RuntimeInstallError(FleetError):
    """The runtime could not be built or installed."""


def build_cache() -> Path:
    """Where fleet's wheel, its prepared tree and pip's zip are kept once per source
    digest, for every fleet of this user: `$XDG_CACHE_HOME/fleet/runtime` (default
    `~/.cache/fleet/runtime`), made 0700: what is in it runs on the nodes."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fleet"
    for directory in (base, base / "runtime"):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            os.chmod(directory, 0o700)
    return base / "runtime"


def runtime_dir(version: str = __version__) -> str:
    return f"{NODE_ROOT}/{version}"


def python_word(version: str = __version__) -> str:
    """The runtime's interpreter as a shell word (expanded on the node)."""
    return f'"$HOME"/{runtime_dir(version)}/bin/python'


def env_assignments(version: str = __version__) -> list[str]:
    """FLEET_PYTHON and PATH for every command on a node (`export` words)."""
    return [f"FLEET_PYTHON={python_word(version)}", f'PATH="$HOME"/{runtime_dir(version)}/bin:"$PATH"']


def runtime_check(version: str = __version__) -> str:
    """Shell that stops with an error naming the runtime when FLEET_PYTHON's runtime is
    not on the node (exit 127), or is not the one in $FLEET_RUNTIME, the stamp this
    control plane installs (exit 126). Used before anything of a job runs on a node."""
    missing = (f"fleet: the node runtime {DIST} {version} is not installed on this node "
               f"(~/{runtime_dir(version)}/bin/python is missing); run \\`fleet up\\` to install it")
    other = ("fleet: this node's runtime is '$found', the control plane needs '$FLEET_RUNTIME'; "
             "run \\`fleet up\\` to upgrade it")
    return (f'found=$(cat "$(dirname "$(dirname "$FLEET_PYTHON")")"/{STAMP} 2>/dev/null); '
            f'if [ ! -x "$FLEET_PYTHON" ] || [ -z "$found" ]; then echo "{missing}" >&2; exit 127; fi; '
            f'if [ -n "$FLEET_RUNTIME" ] && [ "$found" != "$FLEET_RUNTIME" ]; then echo "{other}" >&2; exit 126; fi')


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


# -- what is uploaded ------------------------------------------------------------------
def source_tree() -> Path | None:
    """The checkout fleet runs from, when it runs from one (an editable install)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and f'name = "{DIST}"' in pyproject.read_text():
        return root
    return None


@functools.cache
def known_extras() -> tuple[str, ...]:
    """fleet's extras, as the wheel the nodes get will declare them: the checkout's
    pyproject.toml when fleet runs from one, else the installed distribution's metadata."""
    root = source_tree()
    if root is not None:
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
        return tuple(project.get("optional-dependencies", {}))
    try:
        return tuple(metadata.metadata(DIST).get_all("Provides-Extra") or ())
    except metadata.PackageNotFoundError:
        return ()


def _tree_files(root: Path) -> list[Path]:
    files = [root / name for name in _SOURCE_FILES if (root / name).is_file()]
    for path in sorted((root / "fleet").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    return files


def _digest_files(root: Path, files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_wheel(cache: Path) -> Path:
    """fleet's wheel, built once per source digest (a checkout) or repacked once from the
    installed distribution, cached under `cache`."""
    root = source_tree()
    if root is None:
        return _repack_installed(cache)
    files = _tree_files(root)
    target_dir = cache / f"{__version__}-{_digest_files(root, files)}"
    built = sorted(target_dir.glob("*.whl"))
    if built:
        return built[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        source = Path(tmp) / "src"
        for path in files:  # a copy: building never writes into the checkout
            (source / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / path.relative_to(root))
        out = Path(tmp) / "out"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "-w", str(out), str(source)],
            capture_output=True, text=True, check=False, timeout=600,
        )
        wheels = sorted(out.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeInstallError(f"could not build fleet's wheel: {(result.stdout + result.stderr).strip()[-1500:]}",
                                hint="the control plane needs setuptools (pip install setuptools)")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        shutil.move(str(wheels[0]), staged / wheels[0].name)
        try:
            os.replace(staged, target_dir)
        except OSError:  # another `up` built it meanwhile
            pass
    return min(target_dir.glob("*.whl"))


def _repack_installed(cache: Path) -> Path:
    """A wheel of the installed distribution (fleet installed from the index, no checkout)."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise RuntimeInstallError(f"fleet runs neither from a checkout nor from an installed {DIST}: "
                            "there is nothing to put on the nodes", hint=f"pip install {DIST}") from None
    files = [f for f in dist.files or [] if f.parts[0] == "fleet" or f.parts[0].endswith(".dist-info")]
    files = [f for f in files if "__pycache__" not in f.parts and f.name not in ("RECORD", "INSTALLER",
                                                                                   "REQUESTED", "direct_url.json")]
    base = Path(str(dist.locate_file("")))
    digest = hashlib.sha256()
    for f in sorted(files, key=str):
        digest.update(str(f).encode() + b"\0" + (base / f).read_bytes())
    target = cache / f"{__version__}-installed-{digest.hexdigest()[:16]}" / f"{DIST.replace('-', '_')}-{__version__}-py3-none-any.whl"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    tmp = target.with_name(f".{target.name}.tmp")
    records = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in sorted(files, key=str):
            data = (base / f).read_bytes()
            archive.writestr(str(PurePosixPath(*f.parts)), data)
            records.append(f"{PurePosixPath(*f.parts)},sha256={_urlsafe_sha(data)},{len(data)}")
        records.append(f"{info}/RECORD,,")
        archive.writestr(f"{info}/RECORD", "\n".join(records) + "\n")
    os.replace(tmp, target)
    return target


def _urlsafe_sha(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeInstallError(f"the control plane has no {name} to put on the nodes", hint=f"pip install {name}")
    return Path(spec.origin).parent


def _add_package(archive: zipfile.ZipFile, package: Path) -> None:
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            archive.write(path, str(path.relative_to(package.parent)))


def pip_zip(cache: Path) -> Path:
    """The control plane's pip as a zip that runs on the node (`python pip.zip/pip`), so
    that the node's interpreter needs no pip of its own. Uploaded only to nodes that lack
    something their image does not provide."""
    version = metadata.version("pip")
    target = cache / f"pip-{version}.zip"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".pip-{version}.{os.getpid()}.zip"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        _add_package(archive, _package_dir("pip"))
    os.replace(tmp, target)
    return target


# Console scripts of the tree start the interpreter beside them (the distlib trick for
# long shebangs): the runtime's absolute path holds the node's $HOME, unknown here.
_SCRIPT_HEAD = (b"#!/bin/sh\n"
                b"'''exec' \"$(dirname -- \"$(readlink -f -- \"$0\")\")/python\" \"$0\" \"$@\"\n"
                b"' '''\n")


def _zip_packages(site: Path) -> None:
    """Packs what the wheel put in `site` (fleet's package) into one zip that a .pth
    puts on sys.path (zipimport; its path relative to the site directory), keeping the
    dist-info as files with a RECORD that lists the zip. A node then creates about a
    dozen files for the runtime instead of about 150: creating files is most of what
    an install costs a node, and the package reads no files beside its modules there."""
    info = next(site.glob("*.dist-info"))
    packed = sorted(p for p in site.rglob("*") if p.is_file() and not p.is_relative_to(info)
                    and p.suffix not in (".pth", ".pyc") and "__pycache__" not in p.parts)
    with zipfile.ZipFile(site / ZIPPED, "w") as archive:
        for path in packed:
            entry = zipfile.ZipInfo(path.relative_to(site).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr, entry.compress_type = 0o644 << 16, zipfile.ZIP_DEFLATED
            archive.writestr(entry, path.read_bytes())
    for top in {path.relative_to(site).parts[0] for path in packed}:
        target = site / top
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (site / ZIPPED_PTH).write_text(f"{ZIPPED}\n")
    record = info / "RECORD"
    rows = [row for row in csv.reader(record.read_text().splitlines())
            if row and (site / row[0]).exists() and not (site / row[0]).samefile(record)]
    for path in (site / ZIPPED, site / ZIPPED_PTH):
        data = path.read_bytes()
        rows.append([path.name, f"sha256={_urlsafe_sha(data)}", str(len(data))])
    rows.append([f"{info.name}/RECORD", "", ""])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())


def build_tree(wheel: Path) -> Path:
    """fleet's wheel unpacked once, here, by pypa's `installer` into a prepared tree:
    `site-packages/` (fleet's package zipped, see _zip_packages, and its dist-info) and
    `bin/` (the console scripts), as a tar beside the wheel. Every node's runtime gets
    this same tree."""
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.records import RecordEntry
    from installer.scripts import Script
    from installer.sources import WheelFile
    from installer.utils import Scheme

    class Destination(SchemeDictionaryDestination):
        def write_script(self, name: str, module: str, attr: str, section: str) -> RecordEntry:  # type: ignore[override]
            _, code = Script(name, module, attr, section).generate("python", "posix")  # type: ignore[arg-type]
            data = _SCRIPT_HEAD + code.split(b"\n", 1)[1]
            return self.write_to_fs(Scheme("scripts"), name, io.BytesIO(data), is_executable=True)

    target = wheel.with_name(f"{wheel.stem}.{TREE}")
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".tree-") as tmp:
        stage = Path(tmp) / "tree"
        site = str(stage / "site-packages")
        schemes = {"purelib": site, "platlib": site, "scripts": str(stage / "bin"),
                   "headers": str(stage / "include"), "data": str(stage)}
        with WheelFile.open(wheel) as source:
            install(source, Destination(schemes, interpreter="python", script_kind="posix"),
                    additional_metadata={"INSTALLER": b"fleet\n"})
        _zip_packages(stage / "site-packages")
        mtime = int(wheel.stat().st_mtime)

        def normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            return info

        staged = Path(tmp) / TREE
        with tarfile.open(staged, "w") as archive:
            for top in ("site-packages", "bin"):
                if (stage / top).exists():
                    archive.add(stage / top, top, filter=normalised)
        os.replace(staged, target)
    return target


def node_bundle(tree: Path, config: dict) -> bytes:
    """What the pilot's upload puts on a node: a zip that Python runs (`python
    runtime.pyz`), with the node's side of the runtime as __main__, its config, the
    prepared tree, and pypa's `packaging` (pure Python) to import from the zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(_NODE_SCRIPT, "__main__.py")
        archive.writestr("config.json", json.dumps(config))
        archive.write(tree, TREE, compress_type=zipfile.ZIP_STORED)
        _add_package(archive, _package_dir("packaging"))
    return buffer.getvalue()


@dataclass(frozen=True)
class Artifacts:
    wheel: Path
    tree: Path
    tree_sha: str
    pip: Path
    requirements: list[str]  # Requires-Dist lines of the chosen extras (markers kept) + packages


def extra_requirements(wheel: Path, extras: Sequence[str]) -> list[str]:
    """Requires-Dist lines of the wheel that belong to the chosen extras (with their
    markers: the node evaluates them); the base dependencies (the control plane's) stay out."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(archive.read(name).decode())
    known = meta.get_all("Provides-Extra") or []
    unknown = [extra for extra in extras if extra not in known]
    if unknown:
        raise UsageError(f"runtime.extras: fleet has no extra {', '.join(map(repr, unknown))}",
                         hint=f"fleet's extras: {', '.join(known)}")
    lines = []
    for line in meta.get_all("Requires-Dist") or []:
        if ";" in line and "extra" in line.split(";", 1)[1] and any(f'"{e}"' in line or f"'{e}'" in line
                                                                      for e in extras):
            lines.append(line)
    return lines


# -- the layout a pilot reports ------------------------------------------------------
_INTERPRETER_NAME = re.compile(r"python(3(\.\d+)?)?")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")
_CFG_KEYS = ("home", "include-system-site-packages", "version", "executable")


def _safe_absolute(path: object) -> bool:
    return (isinstance(path, str) and _SAFE_PATH.fullmatch(path) is not None
            and ".." not in PurePosixPath(path).parts)


def checked_layout(layout: object, image: Sequence[str]) -> dict | None:
    """A pilot's layout in the canonical form the other nodes replay, or None when it is
    not one a virtualenv of the runtime can have. A node reports it, so nothing in it is
    trusted: links are interpreter names; absolute paths are checked again on each node
    to be that node's own interpreter; pyvenv.cfg is rebuilt from the known keys, its
    `home` the executable's directory; the .pth names only directories of the image (never
    the shared directory, nothing a .pth would execute)."""
    if not isinstance(layout, dict):
        return None
    site, links, lib64, cfg, pth = (layout.get(k) for k in ("site", "links", "lib64", "cfg", "pth"))
    if not isinstance(site, str) or not re.fullmatch(r"lib/python3\.\d+/site-packages", site):
        return None
    if not isinstance(links, dict) or "python" not in links or lib64 not in (None, "lib"):
        return None
    for name, target in links.items():
        if not (isinstance(name, str) and _INTERPRETER_NAME.fullmatch(name)):
            return None
        if not (isinstance(target, str) and (_INTERPRETER_NAME.fullmatch(target) or _safe_absolute(target))):
            return None
    if not isinstance(cfg, str):
        return None
    values: dict[str, str] = {}
    for line in cfg.splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in _CFG_KEYS:
            return None
        values[key.strip()] = value.strip()
    executable = values.get("executable")
    if not _safe_absolute(executable) or values.get("include-system-site-packages", "false") != "false":
        return None
    assert executable is not None
    if values.get("home") != str(PurePosixPath(executable).parent):
        return None
    if not re.fullmatch(r"[0-9A-Za-z.+]*", values.get("version", "")):
        return None
    roots = [str(PurePosixPath(entry)) for entry in image]
    if pth is not None:
        if not isinstance(pth, str):
            return None
        for line in pth.splitlines():
            if not _safe_absolute(line) or not any(line == r or line.startswith(r.rstrip("/") + "/") for r in roots):
                return None
    canonical = "".join(f"{key} = {values[key]}\n" for key in _CFG_KEYS if key in values)
    return {"site": site, "links": dict(sorted(links.items())), "lib64": lib64, "cfg": canonical,
            "pth": pth or None}


def _absolute_interpreters(layout: dict) -> set[str]:
    cfg = dict(line.split(" = ", 1) for line in layout["cfg"].splitlines())
    return {t for t in layout["links"].values() if t.startswith("/")} | {cfg["executable"]}


def replay_payload(layout: dict) -> bytes:
    """What a node that staged the tree needs of `layout`, read by its shell from stdin
    (see _replay_lines): the site directory, the interpreters to check, then the skeleton
    as a small tar of its own: bin/ with the venv's links, include/, the site directory's
    parents, lib64, pyvenv.cfg and the image's .pth in the staged site-packages. Every
    line is a value checked_layout accepted (no spaces, no newlines)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as out:
        def add(name: str, kind: bytes, *, data: bytes = b"", link: str = "", mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            out.addfile(info, io.BytesIO(data) if data else None)

        for directory in ("bin", "include", *map(str, reversed(PurePosixPath(layout["site"]).parents[:-1]))):
            add(directory, tarfile.DIRTYPE)
        for name, link in layout["links"].items():
            add(f"bin/{name}", tarfile.SYMTYPE, link=link, mode=0o777)
        if layout["lib64"]:
            add("lib64", tarfile.SYMTYPE, link=layout["lib64"], mode=0o777)
        add("pyvenv.cfg", tarfile.REGTYPE, data=layout["cfg"].encode(), mode=0o644)
        if layout["pth"]:
            add(f"site-packages/{PTH}", tarfile.REGTYPE, data=layout["pth"].encode(), mode=0o644)
    skeleton = buffer.getvalue()
    interpreters = sorted(_absolute_interpreters(layout))
    header = "".join(f"{line}\n" for line in (layout["site"], len(interpreters), *interpreters, len(skeleton)))
    return header.encode() + skeleton


def staged_dir(tree_sha: str, version: str = __version__) -> str:
    """Where a node stages the layout-independent tree (under its home)."""
    return f"{NODE_ROOT}/.staged-{version}-{tree_sha[:16]}"


def _replay_lines(stamp: str, tree_sha: str) -> list[str]:
    """Shell that reads a replay_payload from stdin and makes the staged tree the
    runtime: exit 6 (after `staged`) when stdin ends first, 5 when an interpreter the
    layout names is not "$real", this node's own."""
    staged, root = f'"$HOME"/{staged_dir(tree_sha)}', f'"$HOME"/{runtime_dir()}'
    return [
        "IFS= read -r site || { echo staged; exit 6; }",
        "read -r count",
        'while [ "$count" -gt 0 ]; do IFS= read -r interpreter',
        # -ef, a builtin: both names are one file once symlinks are followed
        '  [ "$interpreter" -ef "$real" ] || { echo changed; exit 5; }; count=$((count - 1)); done',
        "read -r size",
        f'dd bs="$size" count=1 iflag=fullblock status=none | tar -xf - -C {staged}',
        f'mv {staged}/site-packages {staged}/"$site"',
        f"printf '%s\\n' {_quote(stamp)} > {staged}/{STAMP}",
        f"[ ! -e {root} ] || rm -rf {root}",
        f"mv {staged} {root}",
        "echo installed",
    ]


FINGERPRINTED = "fingerprinted"  # ensure_shell's last line before it reads its stdin
# Shell that removes a node's stagings (of any tree): before it stages, before a full install.
_CLEAR_STAGINGS = f'for old in "$HOME"/{NODE_ROOT}/.staged-*; do [ ! -e "$old" ] || rm -rf "$old"; done'


def ensure_shell(stamp: str, fingerprint: str, tree_sha: str, tree_size: int) -> str:
    """The one SSH operation that brings a node its runtime when a layout is known (and
    that checks it first): the stamp (`read`, a builtin: on a complete node no process
    starts but the shell) prints `present` and ends. Otherwise it prints `absent`, the
    fingerprint lines (fingerprint_shell) and FINGERPRINTED, then reads from stdin what
    the control plane decided on seeing them: nothing (exit 6, `unstaged`); `stage` and
    the tree (its first `tree_size` bytes: a tar, which tar refuses when cut short; SSH's
    MAC guards it, the zip in it has its CRCs), unpacked into the staging directory; or
    `replay` for a tree staged earlier. Then a replay_payload makes the runtime (exit 0,
    `installed`), or stdin ends (exit 6, `staged`); exit 5: the layout's interpreter is
    not this node's. Stagings of other trees go first."""
    staged = f'"$HOME"/{staged_dir(tree_sha)}'
    return "\n".join([
        f'found=; {{ read -r found < "$HOME"/{runtime_dir()}/{STAMP}; }} 2>/dev/null',
        f'if [ "$found" = {_quote(stamp)} ]; then echo present; exit 0; fi',
        "echo absent",
        fingerprint,
        f"echo {FINGERPRINTED}",
        "IFS= read -r mode || mode=",
        'case "$mode" in',
        "  stage)",
        f"    {_CLEAR_STAGINGS}",
        (f"    mkdir -p {staged}.part && dd bs={tree_size} count=1 iflag=fullblock status=none "
         f"| tar -xf - -C {staged}.part && mv {staged}.part {staged} || {{ echo unstaged; exit 6; }} ;;"),
        f"  replay) [ -d {staged}/site-packages ] || {{ echo unstaged; exit 6; }} ;;",
        "  *) echo unstaged; exit 6 ;;",
        "esac",
        "set -e",
        *_replay_lines(stamp, tree_sha),
    ]) + "\n"


def fingerprint_shell(python: str, image: Sequence[str]) -> str:
    """Shell that sets `real` (the interpreter the runtime is made from, `python` a shell
    word, symlinks resolved) and, when there is one, prints it, then what a node's runtime
    is made from: that interpreter's listing and the names in the image's directories
    (shell globs, no process). The control plane hashes these lines (fingerprint_of):
    nodes of one digest get the same virtualenv layout."""
    dirs = " ".join(f"{_quote(e)} {_quote(e)}/lib/python*/site-packages {_quote(e)}/lib/python*/dist-packages"
                    for e in image)
    listing = f'for d in {dirs}; do set -- "$d"/* "$d"/.*; echo "$d: $*"; done; ' if dirs else ""
    return (f'py={python}; real=$(readlink -f -- "$(command -v "$py")" 2>/dev/null); '
            f'if [ -n "$real" ]; then LC_ALL=C; echo "$real"; ls -Ln -- "$real" 2>/dev/null; {listing}fi')


def fingerprint_of(lines: Sequence[str]) -> tuple[str, str] | None:
    """(digest, interpreter) of what fingerprint_shell printed, or None when the node
    found no interpreter."""
    if len(lines) < 2 or not lines[0].startswith("/"):
        return None
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), lines[0]


# -- on the nodes ----------------------------------------------------------------------
@dataclass
class Pending:
    """Nodes whose runtime waits for the head's wheelhouse, and what they lack."""

    nodes: list[Node]
    report: dict


class Runtime:
    """Brings fleet's runtime onto nodes for one `Fleet`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.spec = fleet.spec.runtime
        if fleet.spec.ray.enabled and "ray" not in self.spec.extras:  # the nodes need Ray (fleet[ray])
            self.spec = self.spec.model_copy(update={"extras": [*self.spec.extras, "ray"]})
        self.cache = fleet.spec_path.resolve().parent / ".fleet" / "runtime"  # this fleet's: wheelhouse, layouts
        self._artifacts: Artifacts | None = None
        self._layouts: dict[tuple[str, str], dict | None] = {}
        self._bundles: dict[str, bytes] = {}
        self.pending: Pending | None = None

    @property
    def enabled(self) -> bool:
        return self.spec.install

    def image(self) -> list[str]:
        if self.spec.image is not None:
            return list(self.spec.image)
        return [LOCAL_IMAGE] if self.fleet.spec.provider == "local" else []

    def artifacts(self) -> Artifacts:
        if self._artifacts is None:
            builds = build_cache()
            wheel = build_wheel(builds)
            requirements = extra_requirements(wheel, self.spec.extras) + list(self.spec.packages)
            tree = build_tree(wheel)
            self._artifacts = Artifacts(wheel=wheel, tree=tree, tree_sha=_sha256(tree), pip=pip_zip(builds),
                                        requirements=requirements)
        return self._artifacts

    def stamp(self) -> str:
        art = self.artifacts()
        settings = json.dumps([self.spec.model_dump(mode="json"), self.image(), art.requirements], sort_keys=True)
        return (f"{DIST} {__version__} wheel={_sha256(art.wheel)[:12]} "
                f"settings={hashlib.sha256(settings.encode()).hexdigest()[:12]}")

    def describe(self) -> str:
        """One line for `up --dry-run`: what every node will get."""
        if not self.enabled:
            return "not installed (runtime.install: false): jobs need `python:`"
        image = ", ".join(self.image()) or "none (everything from the index)"
        source = "the head's wheelhouse (filled by this machine)" if self.spec.wheelhouse else "the nodes' index"
        extras = ",".join(self.spec.extras)
        packages = f" + {', '.join(self.spec.packages)}" if self.spec.packages else ""
        return (f"{DIST} {__version__}[{extras}]{packages} in ~/{runtime_dir()}, on the image's {image}; "
                f"what the image lacks from {source}")

    def index_options(self) -> list[str]:
        options: list[str] = []
        if self.spec.index_url:
            options += ["--index-url", self.spec.index_url]
        for url in self.spec.extra_index_urls:
            options += ["--extra-index-url", url]
        for link in self.spec.find_links:
            options += ["--find-links", link]
        return options

    def _python_expression(self) -> str:
        """Shell that picks the interpreter the runtime is made from."""
        if self.spec.python:
            return _quote(self.spec.python)
        for entry in self.image():
            candidate = f"{entry.rstrip('/')}/bin/python"
            return f'"$( [ -x {_quote(candidate)} ] && echo {_quote(candidate)} || echo python3 )"'
        return "python3"

    # -- the steps ---------------------------------------------------------------------
    def ensure(self, nodes: Sequence[Node], result: UpResult) -> list[Node]:
        """Every node gets the runtime, or is reported in `result.failures`. Nodes that
        wait for the wheelhouse (it needs the mounts) are kept and remembered in
        `self.pending`; `finish()` completes them."""
        if not self.enabled or not nodes:
            return list(nodes)
        try:
            stamp = self.stamp()
        except FleetError as error:
            for node in nodes:
                result.failures[node.name] = f"the node runtime: {error.message}"
            return []
        art = self.artifacts()
        tree = art.tree.read_bytes()
        script = ensure_shell(stamp, self._fingerprint_shell(), art.tree_sha, len(tree))
        # The first node goes alone, so that its install (as its environment's pilot when
        # no layout is known) starts at once. Meanwhile the others are checked; those of
        # its environment stage the tree and wait on the same channel for the layout it
        # reports.
        lead, others = nodes[0], list(nodes[1:])
        ran = self._run_plan([lead], script, _Plan(self, stamp, tree))
        ok, absent, staged = self._sort([lead], ran, result, stamp)
        key = _key_of(ran[lead.name].stdout) if absent else None
        pilot = key if key is not None and self._layout(stamp, key[0]) is None else None
        payload: Future[bytes] = Future()
        # A waiting node holds one of the executor's threads until the pilot is done: at
        # most half of them wait, so that the pilot always gets one (it may need a second
        # operation, for pip); the others of its environment only stage.
        plan = _Plan(self, stamp, tree, pilot=pilot, payload=payload, hold=self.fleet.executor.parallelism // 2)
        # The others' operations queue for the executor's threads once the pilot's has one:
        # with many nodes, it would wait behind all of theirs.
        piloting = threading.Event()

        def others_beside_the_pilot() -> GroupResult:
            if pilot is not None:
                piloting.wait(60)
            return self._run_plan(others, script, plan)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-runtime") as side:
            later = side.submit(others_beside_the_pilot) if others else None
            try:
                if pilot is not None:
                    ok += self._install([lead], result, stamp, wheelhouse=None, fingerprints={lead.name: pilot[0]},
                                        started=piloting)
                    absent.remove(lead)
            finally:  # always: the waiting channels end, on an empty payload when there is no layout
                piloting.set()
                layout = self._layout(stamp, pilot[0]) if pilot is not None and lead in ok else None
                payload.set_result(replay_payload(layout) if layout is not None else b"")
            ran = GroupResult({**ran.results, **(later.result().results if later else {})})
        more_ok, more_absent, more_staged = self._sort(others, ran, result, stamp)
        ok += more_ok
        if absent or more_absent:
            # The pilot's environment has no layout now: the pilot failed, or installed
            # something from the index, which the others then install in full too.
            tried = {pilot} if pilot is not None and self._layout(stamp, pilot[0]) is None else set()
            ok += self._install_absent([*absent, *more_absent], ran, result, stamp, script, tree,
                                       staged | more_staged, tried)
        return [n for n in nodes if n in ok or (self.pending is not None and n in self.pending.nodes)]

    def _run_plan(self, nodes: Sequence[Node], script: str, plan: _Plan) -> GroupResult:
        """ensure_shell on `nodes`, their stdin as `plan` decides (thread-safe: no state,
        no log)."""
        if not nodes:
            return GroupResult({})
        try:
            # A node that waits for the pilot's layout waits as long as the pilot's install may take.
            timeout = 1800 + 300 if plan.pilot is not None else 300
            return self.fleet.executor.run([self.fleet.target(n) for n in nodes], script, stdin=plan.stdin,
                                           on_line=plan.on_line, timeout=timeout)
        finally:
            plan.release()

    def _sort(self, nodes: Sequence[Node], ran: GroupResult, result: UpResult, stamp: str
              ) -> tuple[list[Node], list[Node], set[str]]:
        """(the nodes whose runtime is there now, the absent ones, the names of those
        that staged the tree). A node whose layout's interpreter is not its own installs
        in full; one that could not be checked is reported."""
        ok: list[Node] = []
        absent: list[Node] = []
        staged: set[str] = set()
        changed: list[Node] = []
        for node in nodes:
            outcome = ran[node.name]
            lines = outcome.stdout.split()
            if not lines or lines[0] not in ("present", "absent"):
                self._failed(node, result, outcome.describe())
            elif lines[0] == "present" and outcome.ok:
                ok.append(node)
            elif outcome.ok and lines[-1] == "installed":
                ok.append(node)
                self.fleet.state.add_event("runtime", node.name, f"{DIST} {__version__} installed (the prepared "
                                           "tree, in the layout of its environment; nothing from the index)")
            elif outcome.exit_code == 5:
                changed.append(node)
            else:
                absent.append(node)
                if outcome.exit_code == 6 and lines[-1] == "staged":
                    staged.add(node.name)
        return ok + self._install(changed, result, stamp, wheelhouse=None), absent, staged

    def _install_absent(self, nodes: Sequence[Node], ran: GroupResult, result: UpResult, stamp: str, script: str,
                        tree: bytes, staged: set[str], tried: set[tuple[str, str]]) -> list[Node]:
        """The nodes still without the runtime after their ensure_shell: of each
        environment whose layout is unknown, one (the pilot) installs in full and reports
        it; then the rest of every environment whose layout is known gets ensure_shell
        again (a staged tree is replayed), and the others install in full as well (as do
        all of an environment in `tried`, whose pilot found no layout already)."""
        groups: dict[tuple[str, str], list[Node]] = {}
        alone: list[Node] = []
        for node in nodes:
            key = _key_of(ran[node.name].stdout)
            if key is None:  # no interpreter found: the full install, alone
                alone.append(node)
            else:
                groups.setdefault(key, []).append(node)
        pilots = {key: min(group, key=lambda n: n.name in staged)  # an unstaged one first: nothing to waste
                  for key, group in groups.items() if self._layout(stamp, key[0]) is None and key not in tried}
        ok = self._install([*pilots.values(), *alone], result, stamp, wheelhouse=None,
                           fingerprints={node.name: key[0] for key, node in pilots.items()})
        known: list[Node] = []
        full: list[Node] = []
        for key, group in groups.items():
            rest = [n for n in group if n is not pilots.get(key)]
            replayable = self._layout(stamp, key[0]) is not None and (key not in pilots or pilots[key] in ok)
            (known if replayable else full).extend(rest)
        if known:
            again = self._run_plan(known, script, _Plan(self, stamp, tree, staged=staged))
            done, unstaged, _ = self._sort(known, again, result, stamp)
            ok += done
            full += unstaged
        return ok + self._install(full, result, stamp, wheelhouse=None)

    def _fingerprint_shell(self) -> str:
        return fingerprint_shell(self._python_expression(), self.image())

    # -- the prepared tree ---------------------------------------------------------------
    def _layout_path(self, stamp: str, fingerprint: str) -> Path:
        return self.cache / LAYOUTS / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}-{fingerprint}.json"

    def _layout(self, stamp: str, fingerprint: str) -> dict | None:
        """The checked layout a pilot of this environment reported (this run or an earlier
        one, kept under `.fleet/runtime/layouts/`), or None."""
        key = (stamp, fingerprint)
        if key not in self._layouts:
            self._layouts[key] = self.stored_layout(stamp, fingerprint)
        return self._layouts[key]

    def stored_layout(self, stamp: str, fingerprint: str) -> dict | None:
        """The checked layout in the layout's file, read now (thread-safe, unlike
        _layout: the pilot may be remembering it meanwhile)."""
        try:
            return checked_layout(json.loads(self._layout_path(stamp, fingerprint).read_text()), self.image())
        except (OSError, ValueError):
            return None

    def _remember(self, stamp: str, fingerprint: str, layout: object) -> None:
        checked = checked_layout(layout, self.image())
        self._layouts[(stamp, fingerprint)] = checked
        if checked is None:
            return
        path = self._layout_path(stamp, fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(checked))
        os.replace(tmp, path)

    def _bundle(self, tree: Path, config: dict) -> bytes:
        """node_bundle, built once per config in this process (a replacement's pilot
        gets the same as the first `up`'s)."""
        key = json.dumps(config, sort_keys=True)
        if key not in self._bundles:
            self._bundles[key] = node_bundle(tree, config)
        return self._bundles[key]

    def _failed(self, node: Node, result: UpResult, message: str) -> None:
        text = f"the node runtime ({DIST} {__version__}) could not be installed: {message}"
        result.failures[node.name] = text
        self.fleet.state.add_event("runtime_failed", node.name, text)
        self.fleet.log(f"{node.name}: {text}")

    def _install(self, nodes: Sequence[Node], result: UpResult, stamp: str, *, wheelhouse: dict | None,
                 fingerprints: dict[str, str] | None = None, started: threading.Event | None = None) -> list[Node]:
        """The full install (runtime_node.py) on `nodes`; a node named in `fingerprints`
        that installs nothing from the index reports its layout for its environment.
        `started` is set once an executor thread runs the first node's operation."""
        if not nodes:
            return []
        art = self.artifacts()
        incoming = f"{NODE_ROOT}/.incoming-{__version__}"
        config = {
            "root": runtime_dir(), "stamp": stamp, "image": self.image(), "tree_sha": art.tree_sha,
            "pip": art.pip.name, "requirements": art.requirements, "extras": list(self.spec.extras),
            "index_options": self.index_options(), "need_wheelhouse": self.spec.wheelhouse,
            "wheelhouse": wheelhouse,
        }
        self.fleet.log(f"installing the node runtime {DIST} {__version__} on {len(nodes)} node(s)")

        def receiving_and_running(name: str, size: int) -> str:
            # The file comes on stdin (one SSH operation); a staging left from a pilot
            # whose layout could not be replayed goes too.
            return (receive_files([(f"{incoming}/{name}", size)])
                    + f"{_CLEAR_STAGINGS}\n"
                    + f'cd "$HOME"/{incoming} && {self._python_expression()} runtime.pyz\n')

        bundle = self._bundle(art.tree, config)

        def bundle_for(target: Target) -> tuple[bytes]:  # called on the thread that runs the operation
            if started is not None:
                started.set()
            return (bundle,)

        ran = self.fleet.executor.run([self.fleet.target(n) for n in nodes], receiving_and_running("runtime.pyz", len(bundle)),
                                      timeout=1800, stdin=bundle_for)
        # Nodes that lack something the image does not have get the control plane's pip, once.
        need_pip = [n for n in nodes if ran[n.name].exit_code == 4]
        if need_pip:
            pip = art.pip.read_bytes()
            rerun = self.fleet.executor.run([self.fleet.target(n) for n in need_pip],
                                            receiving_and_running(art.pip.name, len(pip)), timeout=1800, stdin=pip)
            ran = GroupResult({**ran.results, **rerun.results})
        ok: list[Node] = []
        waiting: list[Node] = []
        report: dict = {}
        for node in nodes:
            outcome = ran[node.name]
            answer = _last_json(outcome)
            if outcome.ok:
                ok.append(node)
                if fingerprints and node.name in fingerprints and not answer.get("installed"):
                    self._remember(stamp, fingerprints[node.name], answer.get("layout"))
                self.fleet.state.add_event("runtime", node.name, f"{DIST} {__version__} installed "
                                           f"({', '.join(answer.get('installed') or []) or 'nothing from the index'})")
            elif outcome.exit_code == 3 and answer.get("status") == "missing" and wheelhouse is None:
                waiting.append(node)
                report = report or answer
            else:
                message = answer.get("error") or outcome.describe()
                tail = answer.get("tail")
                self._failed(node, result, f"{message}\n{tail}" if tail else message)
        if waiting:
            known = self.pending.nodes if self.pending else []
            self.pending = Pending(nodes=[*known, *waiting], report=self.pending.report if self.pending else report)
        return ok

    def finish(self, head: Node | None, result: UpResult) -> None:
        """After the mounts: fill the head's wheelhouse once with what the pending nodes
        lack, then install it there, hash-checked."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if head is None:
            for node in pending.nodes:
                self._failed(node, result, "its packages come from the head's wheelhouse, and no head is up")
            return
        try:
            files = fill_wheelhouse(pending.report, self.index_options(), self.cache / "wheelhouse")
        except FleetError as error:
            for node in pending.nodes:
                self._failed(node, result, f"the wheelhouse could not be filled: {error.message}")
            return
        key = hashlib.sha256("\n".join(sorted(pin for _, pin in files)).encode()).hexdigest()[:16]
        shared = self.fleet.spec.shared
        house = f"{shared.path.rstrip('/')}/{WHEELHOUSE}/{key}"
        head_target = self.fleet.target(head)
        # What is there already stays (nodes check every file's hash, whoever wrote it).
        listed = self.fleet.executor.run([head_target], f"ls {_home_word(house)} 2>/dev/null; true", timeout=60)
        present = set(listed[head.name].stdout.split()) if listed[head.name].ok else set()
        for path, _pin in files:
            if path.name in present:
                continue
            put = self.fleet.executor.put([head_target], path, f"{house}/{path.name}")
            if not put[head.name].ok:
                for node in pending.nodes:
                    self._failed(node, result, f"upload to the head's wheelhouse: {put[head.name].describe()}")
                return
        self.fleet.state.add_event("wheelhouse", head.name, f"{len(files)} file(s) in {house}")
        dirs = [house, f"{shared.mount.rstrip('/')}/{WHEELHOUSE}/{key}"]
        waiting = [n for n in pending.nodes if n.name not in result.failures]
        by_dir: dict[str, list[Node]] = {}
        for node in waiting:
            by_dir.setdefault(dirs[0] if node.role == Role.HEAD else dirs[1], []).append(node)
        for directory, nodes in by_dir.items():
            self._install(nodes, result, self.stamp(),
                          wheelhouse={"dir": directory, "pins": [pin for _, pin in files]})


class _Plan:
    """What each node's ensure_shell gets on stdin, decided as its check reports: the
    executor's threads call on_line, each channel's stdin sender runs stdin(). A node of
    an environment whose layout is known gets the tree (or `replay`, when it staged it
    before) and the layout; one of the pilot's environment gets the tree and waits for
    the pilot's layout (`payload`), up to `hold` of them, the others only stage; the first
    node of another unknown environment is left for its own pilot, the rest stage."""

    def __init__(self, runtime: Runtime, stamp: str, tree: bytes, *, pilot: tuple[str, str] | None = None,
                 payload: Future[bytes] | None = None, hold: int = 0, staged: set[str] | None = None) -> None:
        self.runtime, self.stamp, self.tree = runtime, stamp, tree
        self.pilot, self.payload, self.hold, self.staged = pilot, payload, hold, staged or set()
        self._lock = threading.Lock()
        self._lines: dict[str, list[str]] = {}
        self._decided: dict[str, threading.Event] = {}
        self._parts: dict[str, tuple[bytes | None, ...]] = {}  # None: the pilot's payload, when it comes
        self._left_for_pilot: set[tuple[str, str]] = set()
        self._waiting = 0
        self._released = False

    def on_line(self, node: str, stream: str, line: str) -> None:
        if stream != "stdout":
            return
        with self._lock:
            lines = self._lines.setdefault(node, [])
            lines.append(line)
            if line == "present" and len(lines) == 1:
                self._decide(node, ())
            elif line == FINGERPRINTED and lines[0] == "absent":
                self._decide(node, self._parts_for(node, _key_of("\n".join(lines))))

    def _parts_for(self, node: str, key: tuple[str, str] | None) -> tuple[bytes | None, ...]:
        if key is None:
            return ()
        layout = self.runtime.stored_layout(self.stamp, key[0])
        if layout is not None:
            start: tuple[bytes, ...] = (b"replay\n",) if node in self.staged else (b"stage\n", self.tree)
            return (*start, replay_payload(layout))
        if key == self.pilot:
            if self._waiting < self.hold:
                self._waiting += 1
                return b"stage\n", self.tree, None
            return b"stage\n", self.tree
        if key in self._left_for_pilot:
            return b"stage\n", self.tree
        self._left_for_pilot.add(key)
        return ()

    def _decide(self, node: str, parts: tuple[bytes | None, ...]) -> None:
        self._parts[node] = parts
        self._event(node).set()

    def _event(self, node: str) -> threading.Event:
        event = self._decided.setdefault(node, threading.Event())
        if self._released:
            event.set()
        return event

    def stdin(self, target: Target) -> Iterator[bytes]:
        with self._lock:
            event = self._event(target.name)
        event.wait()
        for part in self._parts.get(target.name, ()):
            if part is None:
                assert self.payload is not None
                part = self.payload.result()
            if part:
                yield part

    def release(self) -> None:
        """After the operation: a node that never reported (unreachable) gets nothing."""
        with self._lock:
            self._released = True
            for event in self._decided.values():
                event.set()


def _key_of(stdout: str) -> tuple[str, str] | None:
    """(fingerprint, interpreter) of a node whose ensure_shell found the runtime absent,
    or None when it could not tell (no interpreter)."""
    lines = stdout.splitlines()
    if not lines or lines[0] != "absent" or FINGERPRINTED not in lines:
        return None
    return fingerprint_of(lines[1:lines.index(FINGERPRINTED)])


def _home_word(path: str) -> str:
    """A shell word for a path on a node: relative paths are under $HOME."""
    return _quote(path) if path.startswith("/") else f'"$HOME"/{_quote(path)}'


def _last_json(outcome: CommandResult) -> dict:
    for line in reversed(outcome.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


# -- the wheelhouse --------------------------------------------------------------------
def _download_options(environment: dict) -> list[str]:
    markers = environment.get("markers", {})
    version = markers.get("python_version", "")
    tags = environment.get("tags", [])
    platforms = list(dict.fromkeys(t.split("-")[2] for t in tags if t.count("-") == 2 and t.split("-")[2] != "any"))
    abis = list(dict.fromkeys(t.split("-")[1] for t in tags if t.count("-") == 2))
    implementation = {"cpython": "cp", "pypy": "pp"}.get(markers.get("implementation_name", "cpython"), "py")
    options = ["--only-binary=:all:", "--python-version", version, "--implementation", implementation]
    for platform in platforms[:40]:
        options += ["--platform", platform]
    for abi in abis[:10]:
        options += ["--abi", abi]
    return options


def fill_wheelhouse(report: dict, index_options: Sequence[str], cache: Path) -> list[tuple[Path, str]]:
    """Download, for the nodes' platform, the missing requirements and whatever they need
    that the image does not provide (one `pip download --no-deps` per distribution, so
    that nothing the image has, torch above all, is ever fetched). Returns each file with
    its hash-pinned requirement line."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    environment = report.get("environment", {})
    markers = dict(environment.get("markers", {}))
    provided = {canonicalize_name(pin.split("==", 1)[0]) for pin in report.get("provided", [])}
    cache.mkdir(parents=True, exist_ok=True)
    # Filled once: the same needs on the same platform reuse the files already downloaded.
    need = json.dumps([sorted(report.get("missing", [])), sorted(provided), environment, list(index_options)],
                      sort_keys=True)
    manifest = cache / f"{hashlib.sha256(need.encode()).hexdigest()[:16]}.json"
    if manifest.is_file():
        known = [(cache / name, pin) for name, pin in json.loads(manifest.read_text())]
        if all(path.is_file() and pin.endswith(_sha256(path)) for path, pin in known):
            return known
    queue = list(report.get("missing", []))
    chosen: dict[str, Path] = {}
    options = _download_options(environment)
    while queue:
        requirement = Requirement(queue.pop(0))
        name = canonicalize_name(requirement.name)
        if name in chosen or name in provided:
            continue
        with tempfile.TemporaryDirectory(dir=cache, prefix=".get-") as tmp:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                 "-d", tmp, *options, *index_options, str(requirement)],
                capture_output=True, text=True, check=False, timeout=1800,
            )
            got = [p for p in Path(tmp).iterdir() if p.suffix == ".whl"]
            if result.returncode != 0 or not got:
                raise RuntimeInstallError(f"pip download {requirement}: {(result.stdout + result.stderr).strip()[-1500:]}")
            path = cache / got[0].name
            os.replace(got[0], path)
        chosen[name] = path
        with zipfile.ZipFile(path) as archive:
            meta_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(archive.read(meta_name).decode())
        for line in meta.get_all("Requires-Dist") or []:
            dependency = Requirement(line)
            wanted = [""] + sorted(requirement.extras)
            if dependency.marker is None or any(dependency.marker.evaluate({**markers, "extra": e}) for e in wanted):
                dependency.marker = None
                queue.append(str(dependency))
    files = []
    for path in chosen.values():
        name, version, _build, _tags = parse_wheel_filename(path.name)
        files.append((path, f"{name}=={version} --hash=sha256:{_sha256(path)}"))
    manifest.write_text(json.dumps([(path.name, pin) for path, pin in files]))
    return files

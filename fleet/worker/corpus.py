"""A real text corpus made offline: the docstrings of the Python standard library.

`python -m fleet.worker.corpus OUT_DIR [--limit N]` writes one UTF-8 file per documented
object (module, class, function, method) as `OUT_DIR/<module>/<qualname>.txt`:
thousands of real texts of very different lengths, with no download. The demo and the
acceptance benchmark embed them. Stdlib only; writes each file atomically; idempotent
(a finished corpus is left as it is).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
import sysconfig
import warnings
from pathlib import Path

SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "this", "antigravity", "lib2to3", "ensurepip",
                 "venv", "pydoc_data", "__", "_", "xxsubtype", "msilib", "winreg", "winsound", "nt",
                 "distutils", "asyncio.__main__", "sqlite3.__main__", "webbrowser", "encodings")


def stdlib_modules() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(set(sys.builtin_module_names) | {m.name for m in pkgutil.iter_modules([stdlib])})
    return [name for name in names if not name.startswith(SKIP_PREFIXES)]


def docstrings(module_name: str) -> list[tuple[str, str]]:
    """(qualname, docstring) of the module and of what it defines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except BaseException:  # noqa: BLE001 - some stdlib modules refuse to import here
        return []
    found: list[tuple[str, str]] = []
    if inspect.getdoc(module):
        found.append(("__module__", inspect.getdoc(module) or ""))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = inspect.getdoc(obj)
            if doc:
                found.append((name, doc))
            if inspect.isclass(obj):
                for member_name, member in sorted(vars(obj).items()):
                    if member_name.startswith("_") or not callable(member):
                        continue
                    doc = inspect.getdoc(member)
                    if doc:
                        found.append((f"{name}.{member_name}", doc))
    return found


def write_corpus(out_dir: Path, *, limit: int, min_chars: int = 40) -> int:
    done_marker = out_dir / ".complete"
    if done_marker.exists():
        return sum(1 for _ in out_dir.rglob("*.txt"))
    written = 0
    for module_name in stdlib_modules():
        for qualname, doc in docstrings(module_name):
            if len(doc) < min_chars:
                continue
            target = out_dir / module_name / f"{qualname}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(doc, encoding="utf-8")
            os.replace(tmp, target)
            written += 1
            if written >= limit:
                done_marker.write_text(str(written))
                return written
    done_marker.write_text(str(written))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.worker.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--limit", type=int, default=5000)
    args = parser.parse_args(argv)
    count = write_corpus(Path(args.out_dir), limit=args.limit)
    print(f"corpus: {count} texts in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A Ray job's working directory as the zip that Ray's GCS keeps (`gcs://_ray_pkg_<sha1>.zip`).

Made on this machine, like Ray's own client makes it (paths relative to the directory,
no top-level folder), but deterministic (sorted entries, fixed timestamps), so the same
files give the same package and Ray reuses it. Version-control and cache folders and
fleet's own state stay out; symlinks are not followed out of the directory.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from fleet.errors import UsageError

MAX_PACKAGE_BYTES = 100 * 2**20
SKIPPED_DIRS = {".git", ".hg", ".svn", "__pycache__", ".fleet", ".venv", ".mypy_cache", ".pytest_cache",
                ".ruff_cache", "node_modules"}
_EPOCH = (1980, 1, 1, 0, 0, 0)


def zip_working_dir(directory: Path) -> bytes:
    """The zip of `directory`'s files (UsageError when it is missing or too big)."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise UsageError(f"working dir {directory} is not a directory")
    buffer = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            for name in sorted(files):
                path = Path(folder) / name
                if path.is_symlink() and not path.resolve().is_relative_to(root):
                    continue
                if not path.is_file():
                    continue
                total += path.stat().st_size
                if total > MAX_PACKAGE_BYTES:
                    raise UsageError(f"working dir {directory} holds more than {MAX_PACKAGE_BYTES >> 20} MiB",
                                     hint="put large data on the shared directory; ship code only")
                info = zipfile.ZipInfo(str(path.relative_to(root)), date_time=_EPOCH)
                info.external_attr = (path.stat().st_mode & 0o777) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    return buffer.getvalue()

"""The input set of a job, frozen into a stable list of chunks, and reading items back.

`freeze()` runs once per job (the first worker or `--init` does it; racing workers agree
because chunks.json is published with an exclusive hard link): it lists the files that
match the `inputs` glob (directory listings only, hidden names skipped), sorts them, and
cuts them into chunks of `chunk_size` items. Chunk ids ("c000000", ...) never change.

chunks.json (paths are relative to `base`, itself relative to the shared root unless
absolute, so that nodes may mount the shared root at different places):

    {"version": 1, "mode": "files"|"records", "inputs": GLOB, "base": DIR, "field": KEY,
     "chunk_size": N, "total": ITEMS, "files": [REL, ...],
     "chunks": [{"id": "c000000", "items": 100, "files": [START, STOP]}, ...]}       files
     "chunks": [{"id": ..., "items": N, "segments": [[FILE, START, END, LINE, ITEMS]]}]  records

Records mode: one item per non-blank line of each file (`.jsonl`/`.ndjson`: the `field`
of each JSON line; any other file: the line's text). A segment is a byte range of one
file holding ITEMS consecutive records (bytes START to END); LINE is the 1-based number
of its first line. Record keys are "REL:LINE".
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.worker.config import WorkerConfig
from fleet.worker.errors import WorkerError
from fleet.worker.layout import JobLayout, dumps, write_exclusive

FORMAT_VERSION = 1
_MAGIC = re.compile(r"[*?\[]")
JSON_LINE_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True, slots=True)
class Segment:
    file: int
    start: int
    end: int
    line: int
    items: int


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    items: int
    files: tuple[int, int] = (0, 0)
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class ChunkList:
    mode: str
    inputs: str
    base: str
    field: str
    chunk_size: int
    files: list[str]
    chunks: list[Chunk]

    @property
    def total(self) -> int:
        return sum(chunk.items for chunk in self.chunks)

    def by_id(self) -> dict[str, Chunk]:
        return {chunk.id: chunk for chunk in self.chunks}

    def base_path(self, layout: JobLayout) -> Path:
        return layout.resolve(self.base)

    def chunk_files(self, chunk: Chunk) -> list[str]:
        start, stop = chunk.files
        return self.files[start:stop]


# -- globbing ---------------------------------------------------------------------------


def split_glob(pattern: str) -> tuple[str, str]:
    """('corpus/**/*.txt') -> ('corpus', '**/*.txt'): the directory part without magic."""
    parts = pattern.replace(os.sep, "/").split("/")
    for index, part in enumerate(parts):
        if _MAGIC.search(part):
            base = "/".join(parts[:index]) or "."
            if pattern.startswith("/") and index <= 1:
                base = "/"
            return base, "/".join(parts[index:])
    return "/".join(parts[:-1]) or ".", parts[-1]


def _glob_regex(rest: str) -> re.Pattern[str]:
    out = []
    parts = rest.split("/")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        piece = ""
        i = 0
        while i < len(part):
            char = part[i]
            if char == "*":
                piece += "[^/]*"
            elif char == "?":
                piece += "[^/]"
            elif char == "[":
                close = part.find("]", i + 2 if part[i + 1 : i + 2] in ("!", "]") else i + 1)
                if close == -1:
                    piece += re.escape(char)
                else:
                    body = part[i + 1 : close].replace("\\", "\\\\")
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    piece += f"[{body}]"
                    i = close
            else:
                piece += re.escape(char)
            i += 1
        out.append(piece + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def list_inputs(base: Path, rest: str) -> list[str]:
    """Files under `base` whose relative path matches `rest` (glob with **), sorted.
    Uses directory listings only; hidden files and directories are skipped."""
    regex = _glob_regex(rest)
    max_depth = None if "**" in rest.split("/") else rest.count("/")
    found: list[str] = []
    base_str = str(base)
    for dirpath, dirnames, filenames in os.walk(base_str):
        rel_dir = os.path.relpath(dirpath, base_str)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        depth = rel_dir.count("/")
        dirnames[:] = (
            []
            if max_depth is not None and depth >= max_depth
            else [name for name in dirnames if not name.startswith(".")]
        )
        for name in filenames:
            if not name.startswith(".") and regex.match(rel_dir + name):
                found.append(rel_dir + name)
    found.sort()
    return found


# -- freezing ---------------------------------------------------------------------------


def _record_lines(path: Path) -> Iterator[tuple[int, int, int]]:
    """(line number, start byte, end byte) of every non-blank line of a file."""
    position = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            end = position + len(raw)
            if raw.strip():
                yield number, position, end
            position = end


def _cut_records(base: Path, files: list[str], chunk_size: int) -> list[tuple[int, list[Segment]]]:
    chunks: list[tuple[int, list[Segment]]] = []
    segments: list[Segment] = []
    count = 0
    for file_index, rel in enumerate(files):
        seg_start = seg_end = seg_line = -1
        seg_items = 0
        for number, start, end in _record_lines(base / rel):
            if seg_start < 0:
                seg_start, seg_line, seg_items = start, number, 0
            seg_end = end
            seg_items += 1
            count += 1
            if count == chunk_size:
                segments.append(Segment(file_index, seg_start, seg_end, seg_line, seg_items))
                chunks.append((count, segments))
                segments, count, seg_start = [], 0, -1
        if seg_start >= 0:
            segments.append(Segment(file_index, seg_start, seg_end, seg_line, seg_items))
    if count:
        chunks.append((count, segments))
    return chunks


def build_chunk_list(layout: JobLayout, config: WorkerConfig) -> ChunkList:
    base, rest = split_glob(config.inputs)
    base_path = layout.resolve(base)
    if not base_path.is_dir():
        raise WorkerError(f"inputs {config.inputs!r}: directory {base_path} does not exist")
    files = list_inputs(base_path, rest)
    if not files:
        raise WorkerError(f"inputs {config.inputs!r} matched no files under {base_path}")
    size = config.effective_chunk_size
    if config.mode == "files":
        count = (len(files) + size - 1) // size
        width = max(6, len(str(count - 1)))
        chunks = [
            Chunk(
                f"c{i:0{width}d}",
                min(size, len(files) - i * size),
                (i * size, min(len(files), (i + 1) * size)),
            )
            for i in range(count)
        ]
    else:
        try:
            cut = _cut_records(base_path, files, size)
        except OSError as exc:
            raise WorkerError(f"inputs: cannot read {exc.filename}: {exc.strerror}") from None
        if not cut:
            raise WorkerError(f"inputs {config.inputs!r}: the matched files hold no records")
        width = max(6, len(str(len(cut) - 1)))
        chunks = [
            Chunk(f"c{i:0{width}d}", items, segments=tuple(segs)) for i, (items, segs) in enumerate(cut)
        ]
    return ChunkList(config.mode, config.inputs, base, config.field, size, files, chunks)


def chunk_list_to_json(chunks: ChunkList) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for chunk in chunks.chunks:
        row: dict[str, Any] = {"id": chunk.id, "items": chunk.items}
        if chunks.mode == "files":
            row["files"] = list(chunk.files)
        else:
            row["segments"] = [[s.file, s.start, s.end, s.line, s.items] for s in chunk.segments]
        rows.append(row)
    return {
        "version": FORMAT_VERSION,
        "created": time.time(),
        "mode": chunks.mode,
        "inputs": chunks.inputs,
        "base": chunks.base,
        "field": chunks.field,
        "chunk_size": chunks.chunk_size,
        "total": chunks.total,
        "files": chunks.files,
        "chunks": rows,
    }


def chunk_list_from_json(data: dict[str, Any]) -> ChunkList:
    chunks = []
    for row in data["chunks"]:
        if data["mode"] == "files":
            chunks.append(Chunk(row["id"], row["items"], (row["files"][0], row["files"][1])))
        else:
            segs = tuple(Segment(*seg) for seg in row["segments"])
            chunks.append(Chunk(row["id"], row["items"], segments=segs))
    return ChunkList(
        data["mode"],
        data["inputs"],
        data["base"],
        data.get("field", "text"),
        data["chunk_size"],
        data["files"],
        chunks,
    )


def load_chunk_list(layout: JobLayout) -> ChunkList | None:
    try:
        raw = layout.chunks_json.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        return chunk_list_from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise WorkerError(f"{layout.chunks_json}: corrupt chunk list ({exc})") from None


def freeze(layout: JobLayout, config: WorkerConfig) -> ChunkList:
    """The job's chunk list: loaded if frozen already, else built and published once."""
    existing = load_chunk_list(layout)
    if existing is None:
        layout.job_dir.mkdir(parents=True, exist_ok=True)
        built = build_chunk_list(layout, config)
        write_exclusive(layout.chunks_json, dumps(chunk_list_to_json(built)))
        existing = load_chunk_list(layout)
        assert existing is not None
    if (existing.mode, existing.inputs, existing.chunk_size) != (
        config.mode,
        config.inputs,
        config.effective_chunk_size,
    ):
        raise WorkerError(
            f"{layout.chunks_json} was frozen for mode={existing.mode} inputs={existing.inputs!r} "
            f"chunk_size={existing.chunk_size}, but job.yaml now says mode={config.mode} "
            f"inputs={config.inputs!r} chunk_size={config.effective_chunk_size}",
        )
    return existing


# -- reading items ----------------------------------------------------------------------


def is_json_lines(rel: str) -> bool:
    return rel.endswith(JSON_LINE_SUFFIXES)


def read_segment(path: Path, segment: Segment, json_field: str | None) -> list[tuple[int, Any]]:
    """(line number, value) for each non-blank line of the segment. A value that cannot
    be decoded is an Exception instance (the item fails, the others go on)."""
    with open(path, "rb") as handle:
        handle.seek(segment.start)
        data = handle.read(segment.end - segment.start)
    out: list[tuple[int, Any]] = []
    number = segment.line - 1
    for raw in data.split(b"\n"):
        number += 1
        if not raw.strip():
            continue
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        value: Any
        try:
            text = raw.decode("utf-8")
            if json_field is None:
                value = text
            else:
                record = json.loads(text)
                if not isinstance(record, dict) or json_field not in record:
                    raise KeyError(f"no field {json_field!r} in this JSON line")
                value = record[json_field]
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            value = exc
        out.append((number, value))
    return out

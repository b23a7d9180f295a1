"""A spec file read as YAML, with the source position of every value kept.

PyYAML's composer gives a node tree whose nodes carry marks (line, column). This module
composes a file with the safe loader, then in one walk over that tree:

- reports duplicate keys (PyYAML would silently keep the last one),
- interpolates `${VAR}` in string values and re-resolves plain scalars, so that
  `count: ${N}` becomes an integer when N is a number,
- builds the plain Python value (dicts, lists, scalars) that the models validate,

and keeps the tree so that an error about `workers.count` can be reported at the line
and column of that value. Every problem becomes a `SpecError`; nothing here raises
anything else for bad input.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fleet.errors import SpecError
from fleet.spec.interpolate import interpolate, needs_interpolation
from fleet.worker.yamlbound import AliasExpansionError, check_expansion

STR_TAG = "tag:yaml.org,2002:str"
MERGE_TAG = "tag:yaml.org,2002:merge"
MAP_TAG = "tag:yaml.org,2002:map"
SEQ_TAG = "tag:yaml.org,2002:seq"
NULL_TAG = "tag:yaml.org,2002:null"

Loc = tuple[str | int, ...]


class _SpecLoader(yaml.SafeLoader):
    """The safe loader, remembering which scalars were plain and untagged: only those
    get their type re-resolved after interpolation (`"${N}"` quoted stays a string)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.implicit_plain: set[int] = set()

    def compose_scalar_node(self, anchor: str | None) -> ScalarNode:
        event = self.peek_event()
        implicit = event.tag is None and event.style is None
        node = super().compose_scalar_node(anchor)
        if implicit:
            self.implicit_plain.add(id(node))
        return node


def format_path(loc: Sequence[str | int]) -> str:
    """`("workers", "count")` -> `workers.count`; `("setup", 2)` -> `setup[2]`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass
class Located:
    """Where a validation error's location lands in the YAML tree."""

    node: Node  # deepest node reached
    key_node: Node | None  # the key of `node` when it is a mapping value
    matched: Loc  # the part of the location that exists in the file
    rest: Loc  # the part that does not (a missing key, a union tag...)


@dataclass
class SourceDocument:
    file: str
    root: Node | None
    data: Any
    problems: list[SpecError] = field(default_factory=list)
    # Scalars whose interpolation failed: validation errors about them would only repeat it.
    unresolved: set[int] = field(default_factory=set)

    def error_at(
        self,
        node: Node | None,
        message: str,
        *,
        loc: Sequence[str | int] = (),
        hint: str | None = None,
        field_text: str | None = None,
    ) -> SpecError:
        line = column = None
        if node is not None:
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
        return SpecError(
            message,
            file=self.file,
            line=line,
            column=column,
            field=field_text if field_text is not None else (format_path(loc) or None),
            hint=hint,
        )

    def locate(self, loc: Sequence[str | int]) -> Located:
        assert self.root is not None
        node: Node = self.root
        key_node: Node | None = None
        matched: list[str | int] = []
        for part in loc:
            if isinstance(node, MappingNode):
                pair = _find_key(node, part)
                if pair is None:
                    break
                key_node, node = pair
            elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                key_node, node = None, node.value[part]
            else:
                break
            matched.append(part)
        return Located(node, key_node, tuple(matched), tuple(loc[len(matched) :]))


def _find_key(node: MappingNode, part: str | int) -> tuple[Node, Node] | None:
    # Last match wins: after merge-key flattening, a mapping's own keys come last.
    for key_node, value_node in reversed(node.value):
        if not isinstance(key_node, ScalarNode):
            continue
        if key_node.value == str(part) or (part is None and key_node.tag == NULL_TAG):
            return key_node, value_node
    return None


def read_source(path: str | Path, env: Mapping[str, str]) -> SourceDocument:
    """Read, compose, check and interpolate a spec file. Problems are collected in
    `problems`; a file that cannot be read or parsed at all raises `SpecError`."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            "file not found", file=file, hint="give the spec with -f/--file, or run from its directory"
        ) from None
    except IsADirectoryError:
        raise SpecError("is a directory, not a spec file", file=file) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=file) from None
    except OSError as exc:
        raise SpecError(f"cannot read the file: {exc.strerror or exc}", file=file) from None
    return parse_source(text, file, env)


def parse_source(text: str, file: str, env: Mapping[str, str]) -> SourceDocument:
    try:
        loader = _SpecLoader(text)  # the reader checks the characters right here
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text, file) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, text, file) from None
        except RecursionError:
            raise SpecError("the YAML is nested too deeply", file=file) from None
        document = SourceDocument(file=file, root=root, data=None)
        if root is None:
            raise SpecError(
                "the file is empty: expected a mapping of keys (name, provider, ...)",
                file=file,
                line=1,
                column=1,
            )
        if not isinstance(root, MappingNode):
            found = "a list" if isinstance(root, SequenceNode) else f"{root.value!r}"
            raise document.error_at(root, f"expected a mapping of keys at the top level, got {found}")
        try:
            check_expansion(root)
        except AliasExpansionError as exc:
            raise SpecError(str(exc), file=file, hint="write the values out, or use fewer aliases") from None
        try:
            _Walker(loader, document, env).prepare(root, ())
            document.data = _Builder(loader, document).build(root, ())
        except RecursionError:
            raise SpecError(
                "the YAML is nested too deeply (or an alias refers to itself)", file=file
            ) from None
        return document
    finally:
        loader.dispose()


def _syntax_error(exc: yaml.YAMLError, text: str, file: str) -> SpecError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        hint = None
        if exc.context and exc.problem and not exc.context.startswith("while"):
            problem = f"{exc.context}, {exc.problem}"  # e.g. "expected a single document..."
        elif exc.context and exc.problem and exc.context_mark is not None:
            hint = f"{exc.context} at line {exc.context_mark.line + 1}"
        if mark is not None and "${" in _line(text, mark.line) and ("{" in problem or "}" in problem):
            hint = "inside [...] or {...}, quote ${VAR} references ('${VAR}') or use block style"
        if "'\\t'" in problem:
            hint = "indent with spaces: YAML does not allow tabs for indentation"
        if mark is None:
            return SpecError(f"invalid YAML: {problem}", file=file, hint=hint)
        return SpecError(
            f"invalid YAML: {problem}", file=file, line=mark.line + 1, column=mark.column + 1, hint=hint
        )
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        return SpecError(
            f"invalid YAML: {exc.reason} (character {exc.character!r})", file=file, line=line, column=column
        )
    return SpecError(f"invalid YAML: {exc}", file=file)


def _line(text: str, index: int) -> str:
    lines = text.splitlines()
    return lines[index] if 0 <= index < len(lines) else ""


class _Walker:
    """First pass: duplicate keys and interpolation, each node once (aliases share nodes)."""

    def __init__(self, loader: _SpecLoader, document: SourceDocument, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.document = document
        self.env = env
        self.seen: set[int] = set()

    def prepare(self, node: Node, loc: Loc) -> None:
        if id(node) in self.seen:
            return
        self.seen.add(id(node))
        if isinstance(node, ScalarNode):
            self._interpolate(node, loc)
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self.prepare(item, (*loc, index))
        elif isinstance(node, MappingNode):
            first_seen: dict[tuple[str, str], Node] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag != MERGE_TAG:
                    identity = (key_node.tag, key_node.value)
                    if identity in first_seen:
                        first = first_seen[identity]
                        self.document.problems.append(
                            self.document.error_at(
                                key_node,
                                f"duplicate key {key_node.value!r}",
                                loc=(*loc, key_node.value),
                                hint=f"first given at line {first.start_mark.line + 1}; keep one of them",
                            )
                        )
                    else:
                        first_seen[identity] = key_node
                    self.prepare(value_node, (*loc, key_node.value))
                else:
                    self.prepare(value_node, loc)

    def _interpolate(self, node: ScalarNode, loc: Loc) -> None:
        if node.tag != STR_TAG or not needs_interpolation(node.value):
            return
        value, problems = interpolate(node.value, self.env)
        if problems:
            self.document.unresolved.add(id(node))
            for problem in problems:
                self.document.problems.append(
                    self.document.error_at(node, problem.message, loc=loc, hint=problem.hint)
                )
            return
        node.value = value
        if id(node) in self.loader.implicit_plain:
            node.tag = self.loader.resolve(ScalarNode, value, (True, False))


class _Builder:
    """Second pass: plain Python values, with marked errors for what cannot be built."""

    def __init__(self, loader: _SpecLoader, document: SourceDocument) -> None:
        self.loader = loader
        self.document = document
        self.built: dict[int, Any] = {}

    def build(self, node: Node, loc: Loc) -> Any:
        if id(node) in self.built:
            return self.built[id(node)]
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        if isinstance(node, SequenceNode):
            if node.tag != SEQ_TAG:
                self._problem(node, loc, f"unsupported tag {node.tag!r} on a list")
            items: list[Any] = []
            self.built[id(node)] = items
            items.extend(self.build(item, (*loc, index)) for index, item in enumerate(node.value))
            return items
        assert isinstance(node, MappingNode)
        if node.tag != MAP_TAG:
            self._problem(node, loc, f"unsupported tag {node.tag!r} on a mapping")
        try:
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            error = self.document.error_at(
                node, f"invalid merge key: {getattr(exc, 'problem', exc)}", loc=loc
            )
            if mark is not None:
                error.line, error.column = mark.line + 1, mark.column + 1
            self.document.problems.append(error)
            self.document.unresolved.add(id(node))
        mapping: dict[Any, Any] = {}
        self.built[id(node)] = mapping
        for key_node, value_node in node.value:
            key = self.build(key_node, loc)
            if not isinstance(key, Hashable) or isinstance(key, (list, dict)):
                self._problem(key_node, loc, "a key must be a plain value, not a list or mapping")
                continue
            key_text = key_node.value if isinstance(key_node, ScalarNode) else str(key)
            mapping[key] = self.build(value_node, (*loc, key_text))
        return mapping

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self._problem(node, loc, f"cannot read this value: {getattr(exc, 'problem', None) or exc}")
            value = node.value
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2024-13-45
            self._problem(
                node, loc, f"cannot read value {node.value!r}: {exc}", hint="quote it to make it a string"
            )
            value = node.value
        self.built[id(node)] = value
        return value

    def _problem(self, node: Node, loc: Loc, message: str, hint: str | None = None) -> None:
        self.document.problems.append(self.document.error_at(node, message, loc=loc, hint=hint))
        self.document.unresolved.add(id(node))

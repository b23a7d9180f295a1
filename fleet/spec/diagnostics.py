"""Pydantic validation errors turned into `SpecError`s a person can act on.

Each pydantic error has a location (`("workers", "count")`); the YAML tree gives its
line and column, the model gives what was expected there (type, bounds, allowed values,
allowed keys), and difflib suggests the nearest valid key or value for a typo:

    fleet.yaml:4:3: workers.cont: unknown key 'cont' (did you mean 'count'?)
    fleet.yaml:3:10: workers.count: expected an integer >= 0 and <= 10000, got -1
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from yaml.nodes import ScalarNode

from fleet.errors import SpecError
from fleet.spec.models import NAME_PATTERN, SpecValueError
from fleet.spec.yamlsource import Loc, SourceDocument, format_path

# Patterns that deserve words rather than a regular expression in an error message.
PATTERN_WORDS = {
    NAME_PATTERN: "a name of 2-30 characters: lowercase letters, digits and '-', "
    "starting with a letter and not ending with '-'",
}


def register_pattern_words(pattern: str, words: str) -> None:
    """Describe a model's regular expression in words in error messages."""
    PATTERN_WORDS[pattern] = words


_TYPE_ERRORS = {
    "int_type",
    "int_parsing",
    "int_from_float",
    "int_parsing_size",
    "float_type",
    "float_parsing",
    "finite_number",
    "bool_type",
    "bool_parsing",
    "string_type",
    "string_unicode",
    "dict_type",
    "model_type",
    "model_attributes_type",
    "mapping_type",
    "list_type",
    "tuple_type",
    "iterable_type",
    "none_required",
    "literal_error",
    "enum",
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "string_too_short",
    "string_too_long",
    "string_pattern_mismatch",
}


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return None


def _without_none(annotation: Any) -> Any:
    args = _union_args(annotation)
    if args is None:
        return annotation
    rest = [arg for arg in args if arg is not type(None)]
    return rest[0] if len(rest) == 1 else annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def target_at(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[Any, FieldInfo | None]:
    """The annotation expected at `loc` (and its FieldInfo when `loc` ends at a model
    field), or (None, None) when the location cannot be followed."""
    annotation: Any = model
    info: FieldInfo | None = None
    for part in loc:
        annotation = _without_none(annotation)
        info = None
        if _is_model(annotation):
            fields = annotation.model_fields
            if not isinstance(part, str) or part not in fields:
                return None, None
            info = fields[part]
            annotation = info.annotation
            continue
        origin = get_origin(annotation)
        if origin in (list, tuple, Sequence) and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif origin is dict:
            annotation = get_args(annotation)[1]
        elif (args := _union_args(annotation)) is not None:
            candidates = [
                a for a in args if _is_model(a) and isinstance(part, str) and part in a.model_fields
            ]
            if not candidates:
                return None, None
            info = candidates[0].model_fields[str(part)]
            annotation = info.annotation
        else:
            return None, None
    return annotation, info


def allowed_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    annotation, _ = target_at(model, loc)
    annotation = _without_none(annotation)
    if _is_model(annotation):
        return list(annotation.model_fields)
    return []


def _literal_values(annotation: Any) -> list[Any]:
    annotation = _without_none(annotation)
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return []


def _bounds(info: FieldInfo | None) -> list[str]:
    words: list[str] = []
    for item in info.metadata if info is not None else []:
        for cls, symbol, attr in (
            (annotated_types.Ge, ">=", "ge"),
            (annotated_types.Gt, ">", "gt"),
            (annotated_types.Le, "<=", "le"),
            (annotated_types.Lt, "<", "lt"),
        ):
            if isinstance(item, cls):
                words.append(f"{symbol} {getattr(item, attr)}")
    return words


def describe_expected(annotation: Any, info: FieldInfo | None) -> str | None:
    """'an integer >= 0 and <= 10000', "one of 'local', 'gcp', 'aws'", ... or None."""
    optional = _union_args(annotation) is not None and type(None) in get_args(annotation)
    base = _without_none(annotation)
    literals = _literal_values(base)
    if literals:
        text = "one of " + ", ".join(show(v) for v in literals)
    elif base is bool:
        text = "true or false"
    elif base in (int, float):
        text = "an integer" if base is int else "a number"
        bounds = _bounds(info)
        if bounds:
            text += " " + " and ".join(bounds)
    elif base is str:
        pattern = getattr(info, "metadata", None) and next(
            (m.pattern for m in info.metadata if getattr(m, "pattern", None)), None
        )
        text = PATTERN_WORDS.get(pattern, f"a string matching {pattern}") if pattern else "a string"
    elif _is_model(base) or get_origin(base) is dict:
        text = "a mapping"
    elif get_origin(base) in (list, tuple):
        item = get_args(base)[0] if get_args(base) else None
        text = "a list of strings" if item is str else "a list"
    else:
        return None
    return f"{text} (or null)" if optional and not literals else text


def _did_you_mean(word: Any, choices: Sequence[Any]) -> str | None:
    text = str(word)
    options = {str(c): c for c in choices}
    close = difflib.get_close_matches(text, list(options), n=1, cutoff=0.6)
    if not close:
        close = [o for o in options if o.lower() == text.lower()]
    return f"did you mean {show(options[close[0]])}?" if close else None


def validation_errors(
    exc: ValidationError, model: type[BaseModel], document: SourceDocument
) -> list[SpecError]:
    raw = exc.errors(include_url=False)
    # A typo'd key is reported once, as unknown with a suggestion, not also as missing.
    suggested: set[Loc] = set()
    for error in raw:
        if error["type"] == "extra_forbidden":
            loc = tuple(error["loc"])
            allowed = allowed_keys(model, loc[:-1])
            for key in difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6):
                suggested.add((*loc[:-1], key))
    found: list[SpecError] = []
    seen: set[tuple[str | None, int | None, int | None]] = set()
    for error in raw:
        loc = tuple(error["loc"])
        if error["type"] == "missing" and loc in suggested:
            continue
        spec_error = _one_error(error, loc, model, document)
        if spec_error is None:
            continue
        identity = (spec_error.field, spec_error.line, spec_error.column)
        if identity in seen:  # e.g. one error per member of a union
            continue
        seen.add(identity)
        found.append(spec_error)
    return found


def _one_error(error: Any, loc: Loc, model: type[BaseModel], document: SourceDocument) -> SpecError | None:
    kind: str = error["type"]
    context = error.get("ctx") or {}
    value = error.get("input")

    cause = context.get("error")
    if isinstance(cause, SpecValueError):
        where = document.locate((*loc, *cause.at))
        if where.rest == ("[key]",) and where.key_node is not None:
            return document.error_at(where.key_node, cause.message, loc=where.matched, hint=cause.hint)
        field_loc = (*loc, *cause.field) if cause.field is not None else (*where.matched, *where.rest)
        return document.error_at(where.node, cause.message, loc=field_loc, hint=cause.hint)

    where = document.locate(loc)
    if not where.rest and id(where.node) in document.unresolved:
        return None  # its interpolation or reading already failed and was reported

    if kind in ("extra_forbidden", "invalid_key"):
        key: Any = loc[-1]
        if kind == "invalid_key":  # pydantic writes a null key as 'None' in the location
            key = value
            where = document.locate((*loc[:-1], key))
        allowed = allowed_keys(model, loc[:-1])
        if kind == "invalid_key" and not allowed:  # a dict[str, ...] given a number or null key
            node = where.key_node if not where.rest and where.key_node is not None else where.node
            return document.error_at(
                node, f"expected a string key, got {show(key)}", loc=loc[:-1], hint="quote the key"
            )
        hint = _did_you_mean(key, allowed)
        if hint is None and allowed:
            hint = "allowed keys: " + ", ".join(allowed)
        node = where.key_node if not where.rest and where.key_node is not None else where.node
        field_text = format_path((*loc[:-1], str(key) if key is not None else "null"))
        return document.error_at(node, f"unknown key {show(key)}", field_text=field_text, hint=hint)

    if kind == "missing":
        annotation, info = target_at(model, loc)
        hint = info.description if info is not None and info.description else None
        return document.error_at(where.node, f"missing required key {show(loc[-1])}", loc=loc, hint=hint)

    if where.rest == ("[key]",) and where.key_node is not None:
        return document.error_at(where.key_node, _message(kind, error, None, None, value), loc=where.matched)

    annotation, info = target_at(model, where.matched)
    message = _message(kind, error, annotation, info, value)
    hint = None
    if kind in ("literal_error", "enum"):
        hint = _did_you_mean(value, _literal_values(annotation))
    elif kind in ("string_type", "bool_type", "bool_parsing") and isinstance(value, bool):
        hint = f"quote it ('{show(value)}') if you mean the string"
    elif kind in ("model_type", "dict_type") and value is None:
        hint = "remove the key to use the defaults"
    elif kind in ("model_type", "dict_type"):
        keys = allowed_keys(model, where.matched)
        hint = "allowed keys: " + ", ".join(keys) if keys else None
    elif kind == "list_type" and isinstance(value, str):
        hint = "write a YAML list: one '- item' per line, or [a, b]"
    node = where.node
    if isinstance(node, ScalarNode) and node.value == "" and where.key_node is not None:
        node = where.key_node  # `key:` with nothing after it: point at the key
    return document.error_at(node, message, loc=where.matched, hint=hint)


def _message(kind: str, error: Any, annotation: Any, info: FieldInfo | None, value: Any) -> str:
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        return str(cause) if cause is not None else error["msg"]
    context = error.get("ctx") or {}
    if kind in ("too_short", "too_long"):
        bound = "at least" if kind == "too_short" else "at most"
        limit = context.get("min_length" if kind == "too_short" else "max_length")
        noun = "item" if limit == 1 else "items"
        return f"expected {bound} {limit} {noun}, got {context.get('actual_length')}"
    expected = describe_expected(annotation, info) if annotation is not None else None
    if expected is not None and kind in _TYPE_ERRORS:
        return f"expected {expected}, got {show(value)}"
    text: str = error["msg"]
    if text.startswith("Input should be "):
        text = "expected " + text.removeprefix("Input should be ")
    elif text.startswith("Value error, "):
        return text.removeprefix("Value error, ")
    elif text[:1].isupper():
        text = text[0].lower() + text[1:]
    return f"{text}, got {show(value)}"

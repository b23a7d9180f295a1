"""YAML with aliases bounded: a few hundred bytes must not expand to megabytes.

YAML aliases let a document refer to a node many times; built naively, nine levels of
nine aliases ("billion laughs") turn a tiny file into 10^9 values, and any later dump
of the built value writes them all out. Every spec and job file fleet reads goes
through `check_expansion` (on the composed node tree) or `safe_load_bounded`, which
refuse a document whose values, counted with every alias expanded, exceed the values
written in it by more than `ALIAS_EXPANSION_LIMIT`. Lives beside the worker (which reads
job.yaml with it) so that the control plane and the worker share one rule.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

ALIAS_EXPANSION_LIMIT = 10_000


class AliasExpansionError(ValueError):
    """The document's aliases expand beyond the bound (or refer to themselves)."""


def expanded_size(root: Node) -> tuple[int, int]:
    """(values written, values after expanding every alias) of a composed document."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    distinct: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise AliasExpansionError("an alias refers to a node that contains it (a cycle)")
        in_progress.add(key)
        distinct.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        in_progress.discard(key)
        sizes[key] = total
        return total

    expanded = size(root)
    if expanded > len(distinct) + ALIAS_EXPANSION_LIMIT:
        raise AliasExpansionError(_too_big(expanded))
    return len(distinct), expanded


def _too_big(expanded: int) -> str:
    shown = f"{expanded:,}" if expanded < 10**12 else "10^12"
    return (f"YAML aliases expand this document to over {shown} values "
            f"(at most {ALIAS_EXPANSION_LIMIT:,} more than it writes out are allowed)")


def check_expansion(root: Node | None) -> None:
    """Raise AliasExpansionError when `root`'s aliases expand beyond the bound."""
    if root is not None:
        try:
            expanded_size(root)
        except RecursionError:
            raise AliasExpansionError("the YAML is nested too deeply") from None


def safe_load_bounded(text: str) -> Any:
    """`yaml.safe_load` that refuses alias bombs (AliasExpansionError) before building."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        check_expansion(root)
        return None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()

"""YAML text -> Python data, bounded: the one reader of config and recipe files.

PyYAML's ``safe_load`` shares an aliased node instead of copying it, so a few hundred bytes of
nested aliases (``b: [*a, *a, ...]``, "billion laughs") load fast but stand for ``9^k`` values that
any walk (validation, an error message) visits. The document's node graph is composed first and its
expanded size counted (``size(node) = 1 + sum(size(child))``, memoised per node, so the count costs
the graph's size, not the expansion's); over :data:`MAX_NODES` nodes or :data:`MAX_DEPTH` levels it
is a :class:`ConfigError` before any Python value is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError, one_line

MAX_NODES = 100_000
"""The most values a config or recipe may expand to (aliases counted at each use)."""
MAX_DEPTH = 64
"""The deepest nesting of a config or recipe."""


def _expanded_size(node: yaml.Node, depth: int, sizes: dict[int, int], source: str) -> int:
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels")
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:
            raise ConfigError(f"{source}: an alias refers to a value that contains it (a recursive structure)")
        return sizes[key]
    sizes[key] = -1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, depth + 1, sizes, source)
        if total > MAX_NODES:
            raise ConfigError(f"{source}: expands to more than {MAX_NODES:,} values (nested aliases?)")
    sizes[key] = total
    return total


def load_yaml(text: str, source: str) -> Any:
    """The value of the YAML document ``text`` (``None`` when empty); ``source`` names it in errors."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, 0, {}, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {one_line(exc, 300)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()

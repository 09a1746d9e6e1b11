"""YAML reading that remembers where every value came from.

Config errors must name the file, the line and the problem; PyYAML's node tree has the marks, so the document is
composed once, constructed into plain Python data, and the line of every mapping key and sequence item is kept in
a map from its path (``("models", "gpt-4o", "deployments", 0)``) to its line number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# libyaml's parser when PyYAML was built with it (its wheels are): ten times faster on a tenants.yaml of thousands.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    """A config file that cannot be used, with every problem found in it."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


Path_ = tuple[str | int, ...]


@dataclass
class YamlDocument:
    path: Path
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, location: Path_) -> int | None:
        """The line of the deepest part of ``location`` that exists in the file."""
        for end in range(len(location), -1, -1):
            line = self.lines.get(tuple(location[:end]))
            if line is not None:
                return line
        return None

    def where(self, location: Path_) -> str:
        line = self.line_of(location)
        return f"{self.path}, line {line}" if line else str(self.path)


def read_yaml(path: Path) -> YamlDocument:
    """Parse ``path``; raise ConfigError naming the line on a syntax error or a duplicated key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{line}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    doc = YamlDocument(path=path, data=data)
    if node is not None:
        problems: list[str] = []
        _record_lines(node, (), doc.lines, problems, path)
        if problems:
            raise ConfigError(problems)
    return doc


def _record_lines(node: yaml.Node, location: Path_, lines: dict, problems: list[str], path: Path) -> None:
    lines.setdefault(location, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(f"{path}, line {key_node.start_mark.line + 1}: duplicate key '{key}'")
            seen.add(key)
            lines[location + (key,)] = key_node.start_mark.line + 1
            _record_lines(value_node, location + (key,), lines, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, location + (index,), lines, problems, path)

"""YAML with positions: every value knows the file and line it came from.

Both the server configuration (proxy/config.py) and the rules (rules/model.py)
are files a DBA edits by hand, so every error they raise names file:line. This
module sits below both: the pure policy engine never imports the proxy.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "Located", "load_yaml", "load_yaml_text", "parse_networks", "expect"]


class ConfigError(Exception):
    """Invalid configuration; the message starts with file:line."""


# --- YAML with positions --------------------------------------------------------------


class Located:
    """Maps a path of keys inside the document to the line it was written on."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple[Any, ...], int] = {}
        self.env: dict[tuple[Any, ...], str] = {}  # key path -> the environment variable that set it

    def where(self, *path: Any) -> str:
        for i in range(len(path), 0, -1):
            var = self.env.get(path[:i])
            if var is not None:
                return f"environment variable {var}"
        if path and path not in self.lines:  # a section only the environment created
            made = sorted(v for k, v in self.env.items() if k[: len(path)] == path)
            if made:
                return f"environment variable {', '.join(made)}"
        while path and path not in self.lines:
            path = path[:-1]
        return f"{self.source}:{self.lines.get(path, 1)}"


def _to_python(node: yaml.Node, loc: Located, path: tuple[Any, ...]) -> Any:
    loc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise ConfigError(f"{loc.source}:{k.start_mark.line + 1}: mapping keys must be plain names")
            key = k.value
            if key in out:
                raise ConfigError(f"{loc.source}:{k.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = _to_python(v, loc, path + (key,))
            loc.lines[path + (key,)] = k.start_mark.line + 1  # errors about a key point at the key
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, loc, path + (i,)) for i, v in enumerate(node.value)]
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> tuple[Any, Located]:
    """Parse YAML keeping each key's line number (for file:line errors)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}:1: cannot read: {exc.strerror}") from exc
    return load_yaml_text(text, source)


def load_yaml_text(text: str, source: str = "<config>") -> tuple[Any, Located]:
    loc = Located(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and (mark is None or mark.index >= len(text.rstrip())):
            # An unclosed quote or bracket is reported at the end of the file; its start is more useful.
            mark = exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{source}:{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}:1: invalid YAML: {exc}") from exc
    if node is None:
        return {}, loc
    return _to_python(node, loc, ()), loc



def expect(cond: bool, loc: Located, path: tuple[Any, ...], msg: str) -> None:
    if not cond:
        raise ConfigError(f"{loc.where(*path)}: {msg}")


def parse_networks(v: Any, loc: Located, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A list of CIDR networks (errors at their line)."""
    if v is None:
        return ()
    expect(isinstance(v, list), loc, path, "networks must be a list of CIDR networks, e.g. [10.1.0.0/16]")
    out = []
    for i, n in enumerate(v):
        try:
            out.append(ipaddress.ip_network(str(n), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{loc.where(*path, i)}: {exc}") from exc
    return tuple(out)

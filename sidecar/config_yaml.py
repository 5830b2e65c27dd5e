"""Reading a config file's YAML within bounds: a careless or hostile file is refused quickly, with
one clear line, instead of stalling the sidecar, exhausting its memory or ending in a traceback.

Used by `load_config`/`parse_config` (check-config, run) and by every reload, always off the
event loop for reloads. The bounds (docs/configuration.md, "Limits of a config file"):

- size: at most `MAX_CONFIG_BYTES`; a bigger file is not read past the limit;
- encoding: UTF-8 (a leading BOM is allowed);
- nodes: at most `MAX_NODES` values, lists and mappings, every use of an alias counted as a copy
  of what it names, so a "billion laughs" of nested aliases stops after a few lines, before
  anything is expanded;
- depth: at most `MAX_DEPTH` nested lists and mappings (the deepest key of a real config is 6);
- keys: a key given twice in one mapping is an error naming its key path (YAML loaders
  otherwise keep the last one silently); an alias to a node that contains it is refused.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_CONFIG_BYTES = 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 100   # YAML 1.1 reads `1:2:3` as 3723: a long one would take seconds to compute
MAX_PROBLEMS = 50        # lines reported for one config; the rest are counted
TOO_BIG = f"larger than {MAX_CONFIG_BYTES} bytes (1 MiB), the most a config file may be"
_MERGE = "tag:yaml.org,2002:merge"
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class ConfigError(Exception):
    """A config that must not be used. `problems` holds one `key.path: message` line each (at
    most `MAX_PROBLEMS`, then a count of the rest): never a line break inside one."""

    def __init__(self, problems: Iterable[str]) -> None:
        lines = [" ".join(str(problem).split("\n")) for problem in problems]
        if len(lines) > MAX_PROBLEMS:
            lines = [*lines[:MAX_PROBLEMS], f"(root): {len(lines) - MAX_PROBLEMS} more problems not shown"]
        self.problems = lines
        super().__init__("; ".join(self.problems))


def key_path(loc: Iterable[object]) -> str:
    """('models', 'chat', 'backends', 1, 'weight') -> 'models.chat.backends[1].weight'. Keys come
    from the file: an empty key, or one with unprintable characters or spaces at its ends, is
    quoted and escaped, and a long one cut, so a path stays one short, unambiguous line."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        text = str(part)
        if not text or not text.isprintable() or text != text.strip():
            text = json.dumps(text)  # quoted, escaped: "", " x", "a\u0085"
        text = text if len(text) <= 80 else text[:77] + "..."
        out += f".{text}" if out else text
    return out or "(root)"


def read_config_text(path: str | Path) -> str:
    """The text of the file at `path`, read no further than `MAX_CONFIG_BYTES`; `ConfigError`
    when it cannot be read, is bigger, or is not UTF-8."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {TOO_BIG}"])
    return decode(data)


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        where = f"byte 0x{data[exc.start]:02x} at line {line}, column {column}"
        raise ConfigError([f"(root): not UTF-8 text: {where}; a config file must be UTF-8"]) from None


def load_yaml(text: str) -> Any:
    """The Python data of one YAML document within the bounds above; `ConfigError` otherwise."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ConfigError(["(root): not UTF-8 text (a lone surrogate character)"]) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"(root): {TOO_BIG}"])
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except _Refused as exc:
        raise ConfigError([str(exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"(root): invalid YAML{_where(exc, text)}: {_problem(exc)}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(loader.duplicates)
    return data


def _where(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    if isinstance(exc, ReaderError):
        before = text[:exc.position]
        return f" at line {before.count(chr(10)) + 1}, column {exc.position - before.rfind(chr(10))}"
    return ""


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        return str(exc.problem or exc.context or "cannot be read")
    if isinstance(exc, ReaderError):
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"{exc.reason} (#x{character:04x})"
    return str(exc)


class _Refused(Exception):
    """A bound was exceeded: composing stops at once. The message starts with its key path."""


class _BoundedComposer:
    """Builds the node tree from parser events (what PyYAML's Composer does), counting nodes,
    depth and duplicate keys as it goes. Mixed into `_Loader` with a parser and a resolver."""

    # provided by the parser and the resolver `_Loader` mixes in
    check_event: Any
    peek_event: Any
    get_event: Any
    resolve: Any

    def __init__(self) -> None:
        self.anchors: dict[str, Node] = {}
        self._anchor_sizes: dict[str, int] = {}  # nodes an anchored node stands for; absent while open
        self._nodes = 0
        self._path: list[str | int] = []
        self.duplicates: list[str] = []

    def get_single_node(self) -> Node | None:
        self.get_event()                          # stream start
        node = None
        if not self.check_event(StreamEndEvent):
            self.get_event()                      # document start
            node, _ = self._compose(1)
            self.get_event()                      # document end
        if not self.check_event(StreamEndEvent):
            raise ComposerError(None, None, "a config file holds one YAML document, but found another",
                                self.get_event().start_mark)
        self.get_event()                          # stream end
        return node

    def _count(self, nodes: int) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise _Refused(f"{key_path(self._path)}: more than {MAX_NODES} values, lists and mappings (aliases "
                           "counted as copies of what they name); a config needs far fewer")

    def _compose(self, depth: int) -> tuple[Node, int]:
        """The next node, and how many nodes it stands for (aliases expanded)."""
        if self.check_event(AliasEvent):
            event = self.get_event()
            if event.anchor not in self.anchors:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            size = self._anchor_sizes.get(event.anchor)
            if size is None:
                raise _Refused(f"{key_path(self._path)}: alias *{event.anchor} refers to a node that contains it")
            self._count(size)
            return self.anchors[event.anchor], size
        event = self.peek_event()
        if event.anchor is not None and event.anchor in self.anchors:
            raise ComposerError(None, None, f"anchor &{event.anchor} is defined twice", event.start_mark)
        if depth > MAX_DEPTH:
            raise _Refused(f"{key_path(self._path)}: nested deeper than {MAX_DEPTH} lists and mappings")
        self._count(1)
        if self.check_event(ScalarEvent):
            self.get_event()
            node: Node = ScalarNode(self._tag(ScalarNode, event, event.value), event.value, event.start_mark,
                                    event.end_mark, style=event.style)
            size = 1
            if event.anchor is not None:
                self.anchors[event.anchor] = node
        elif self.check_event(SequenceStartEvent):
            node, size = self._sequence(depth)
        else:
            node, size = self._mapping(depth)
        if event.anchor is not None:
            self._anchor_sizes[event.anchor] = size
        return node, size

    def _tag(self, kind: type[Node], event: Any, value: str | None) -> str:
        tag: str | None = event.tag
        return tag if tag not in (None, "!") else str(self.resolve(kind, value, event.implicit))

    def _sequence(self, depth: int) -> tuple[Node, int]:
        start = self.get_event()
        items: list[Node] = []
        node = SequenceNode(self._tag(SequenceNode, start, None), items, start.start_mark, None,
                            flow_style=start.flow_style)
        if start.anchor is not None:
            self.anchors[start.anchor] = node
        size = 1
        while not self.check_event(SequenceEndEvent):
            self._path.append(len(items))
            item, item_size = self._compose(depth + 1)
            self._path.pop()
            items.append(item)
            size += item_size
        node.end_mark = self.get_event().end_mark
        return node, size

    def _mapping(self, depth: int) -> tuple[Node, int]:
        start = self.get_event()
        pairs: list[tuple[Node, Node]] = []
        node = MappingNode(self._tag(MappingNode, start, None), pairs, start.start_mark, None,
                           flow_style=start.flow_style)
        if start.anchor is not None:
            self.anchors[start.anchor] = node
        size = 1
        first_line: dict[tuple[str, str], int] = {}
        while not self.check_event(MappingEndEvent):
            key, key_size = self._compose(depth + 1)
            name = key.value if isinstance(key, ScalarNode) else "?"
            self._path.append(name)
            value, value_size = self._compose(depth + 1)
            self._path.pop()
            pairs.append((key, value))
            size += key_size + value_size
            if isinstance(key, ScalarNode) and key.tag != _MERGE:
                first = first_line.get((key.tag, name))
                if first is None:
                    first_line[(key.tag, name)] = key.start_mark.line + 1
                else:
                    self.duplicates.append(f"{key_path([*self._path, name])}: duplicate key (first on line "
                                           f"{first}); remove one")
        node.end_mark = self.get_event().end_mark
        return node, size


class _BoundedConstructor(SafeConstructor):
    """SafeConstructor, with the errors of a value it cannot build made YAML errors with a mark,
    and numbers of more than `MAX_NUMBER_CHARS` refused before Python computes them."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        if node.tag in _NUMBERS and isinstance(node.value, str) and len(node.value) > MAX_NUMBER_CHARS:
            raise ConstructorError(None, None, f"a number of more than {MAX_NUMBER_CHARS} characters",
                                   node.start_mark)
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise ConstructorError(None, None, f"cannot read this value: {exc}", node.start_mark) from None


class _PyParser(Reader, Scanner, Parser):
    """PyYAML's own parser, for a PyYAML built without libyaml (the same events, ~5x slower)."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)


try:
    from yaml._yaml import CParser as _Events
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _Events = _PyParser  # type: ignore[misc,assignment]


class _Loader(_BoundedComposer, _Events, _BoundedConstructor, Resolver):
    def __init__(self, text: str) -> None:
        _Events.__init__(self, text)
        _BoundedConstructor.__init__(self)
        Resolver.__init__(self)
        _BoundedComposer.__init__(self)

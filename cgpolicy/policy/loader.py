"""Safe YAML loading for hostile input.

Policy files may come from anyone who can write to a policy folder, so reading one must be
fast, bounded in memory and unable to crash the reader. Rather than PyYAML's composer (which
recurses once per nesting level, silently keeps the last of duplicate keys and expands
aliases), this module walks libyaml's event stream with an explicit stack and builds plain
JSON-like data itself. Decisions:

* size: files over :data:`MAX_FILE_BYTES` (16 MiB) are refused before parsing;
* encoding: UTF-8 only; a NUL byte means a binary file; both are located by line;
* anchors, aliases and merge keys (``<<``) are refused outright, which makes expansion
  bombs impossible instead of merely bounded;
* nesting deeper than :data:`MAX_DEPTH` is refused as soon as it is seen, so a
  100,000-deep ``[[[...`` costs 65 events, with the same answer whichever libyaml is
  installed (see :meth:`_Composer._read_whole` for libyaml's own limit);
* at most :data:`MAX_NODES` nodes and :data:`MAX_COLLECTIONS` mappings/lists per file;
* duplicate keys are errors naming both lines;
* mapping keys are kept as their source text (``yes:`` is the key "yes", not True), and
  only JSON-like scalars are built: str, int, float, bool, None. Timestamps stay strings.

Every node's position is kept in a compact :class:`~cgpolicy.policy.sourcemap.SourceMap` so
that later stages can point at FILE:LINE:COL for any path.
"""

from __future__ import annotations

import os
import re
import stat
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from cgpolicy.policy.problems import Path, Problem, field_name, shown
from cgpolicy.policy.sourcemap import SourceMap

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 500_000  # a policy with the most CIDRs allowed (200,000) fits twice over
MAX_COLLECTIONS = 100_000
MAX_PROBLEMS = 1000  # per file, so that a hostile file cannot flood memory with messages

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# libyaml 0.2.6 (bundled in PyYAML's wheels since 6.0.2; Debian's 0.2.5 has no such limit)
# refuses more than 1000 nested levels, and its scanner can get there while looking ahead
# for a ':' before the events of level 65 are out.
_LIBYAML_DEPTH_LIMIT = "exceeded maximum nesting depth"
_YAML_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_YAML_TAG + name for name in ("str", "int", "float", "bool", "null")}
_COLLECTION_TAGS = {None, "!", _YAML_TAG + "seq", _YAML_TAG + "map"}
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,17})\Z")  # YAML 1.1 reads 010 as octal: not here
# No field takes a number beyond 2**20 (a device minor), so one much larger is refused where
# it is written: before int() is asked to read thousands of digits (it raises beyond 4,300),
# and before anything prints a huge hexadecimal one (str() raises for it too).
MAX_NUMBER_CHARACTERS = 32
MAX_NUMBER_BITS = 64
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# A run of CIDR lines libyaml need not see one by one (see _CidrRuns): lines holding only
# "- CIDR", quoted or plain, at one indentation. A plain one has a "/", so that it can only
# be a string (no YAML 1.1 int, float, timestamp or bool has one).
_CIDR_LINE = r"""- (?:"[0-9A-Fa-f:./]+"|'[0-9A-Fa-f:./]+'|[0-9A-Fa-f:.]+/[0-9]+)\n"""
_CIDR_RUN = re.compile(rf"^( *){_CIDR_LINE}(?:\1{_CIDR_LINE}){{7,}}", re.MULTILINE)
_CIDR_VALUE = re.compile(r"""- ["']?([0-9A-Fa-f:./]+)""")
# Characters YAML may read as a line break besides \n: their lines are not the ones counted.
_OTHER_BREAKS = re.compile("[\r\x85\u2028\u2029]")
_TOO_MANY_NODES = f"file has more than {MAX_NODES:,} YAML nodes"
_NO_ALIASES_HINT = (
    "write the value out in full; anchors and aliases are refused so that a small file "
    "cannot expand into a huge one"
)


def _pack(line: int, column: int) -> int:
    return line << 32 | column


def _mark(mark: Any) -> int:
    return _pack(mark.line + 1, mark.column + 1)


def _start(event: yaml.Event) -> tuple[int, int]:
    """Line and column (1-based) where an event starts. The stubs allow an event without
    a mark; the parser (pure or libyaml) marks every event it produces."""
    mark = event.start_mark
    assert mark is not None, event
    return mark.line + 1, mark.column + 1


@dataclass
class Document:
    """One YAML document of a file: plain data, positions, and what was wrong with it."""

    index: int  # 0-based within its file
    line: int
    column: int
    data: Any
    source_map: SourceMap
    problems: list[Problem] = field(default_factory=list)


@dataclass
class LoadedFile:
    """A file's documents, plus the problems that concern the whole file (unreadable,
    too large, not UTF-8, YAML syntax, limits), after which no more documents were read."""

    path: str
    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def load_file(path: str, content: bytes | None = None) -> LoadedFile:
    """Read and parse one file. Never raises for bad content or unreadable files.

    With ``content`` (bytes the caller read from the file itself), ``path`` only names
    them: it is not opened."""
    loaded = LoadedFile(path)
    content = _read(path, loaded) if content is None else _bounded(content, loaded)
    if content is None:
        return loaded
    text = _decode(content, loaded)
    if text is None:
        return loaded
    _Composer(loaded, text).run(content)
    if not loaded.documents and not loaded.problems:
        loaded.problems.append(Problem(path, 1, 1, "", "file is empty: it holds no YAML document"))
    return loaded


def _read(path: str, loaded: LoadedFile) -> bytes | None:
    """The file's bytes, refusing more than MAX_FILE_BYTES (checked before reading when
    the size is known, and by reading at most one byte more when it is not, e.g. /dev/zero)."""
    try:
        # O_NONBLOCK so that a named pipe with no writer cannot hang the open; reads then
        # block again, so a pipe with a writer (/dev/stdin) is read to its end.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with open(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            size = info.st_size if stat.S_ISREG(info.st_mode) else 0
            content = handle.read(MAX_FILE_BYTES + 1) if size <= MAX_FILE_BYTES else b""
    except OSError as error:
        _file_problem(loaded, f"cannot read the file: {error.strerror or error}")
        return None
    if size > MAX_FILE_BYTES or len(content) > MAX_FILE_BYTES:
        shown = f"{size / 2**20:.1f} MiB ({size} bytes)" if size else "larger than 16 MiB"
        _file_problem(
            loaded,
            f"file is {shown}, over the {MAX_FILE_BYTES // 2**20} MiB limit for a policy file",
            "split it into several files; a policy with 100,000 CIDRs takes about 2 MiB",
        )
        return None
    return content


def _bounded(content: bytes, loaded: LoadedFile) -> bytes | None:
    """Bytes read by the caller, held to the same size limit as a file read here."""
    if len(content) <= MAX_FILE_BYTES:
        return content
    _file_problem(
        loaded,
        f"file is larger than {MAX_FILE_BYTES // 2**20} MiB, the limit for a policy file",
        "split it into several files; a policy with 100,000 CIDRs takes about 2 MiB",
    )
    return None


def _file_problem(loaded: LoadedFile, message: str, hint: str | None = None) -> None:
    loaded.problems.append(Problem(loaded.path, 0, 0, "", message, hint))


def _decode(content: bytes, loaded: LoadedFile) -> str | None:
    """UTF-8 text, or None with a problem that locates the first offending byte."""
    if content.startswith(_UTF16_BOMS):
        _file_problem(loaded, "file is UTF-16 encoded", "save it as UTF-8")
        return None
    offset = content.find(b"\0")
    if offset >= 0:
        message = f"file contains a NUL byte at byte offset {offset}: it is binary, not YAML"
        _byte_problem(loaded, content, offset, message)
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = content[error.start]
        message = f"file is not valid UTF-8: byte 0x{byte:02x} at byte offset {error.start}"
        _byte_problem(loaded, content, error.start, message, "save it as UTF-8")
        return None


def _byte_problem(
    loaded: LoadedFile, content: bytes, offset: int, message: str, hint: str | None = None
) -> None:
    line = content.count(b"\n", 0, offset) + 1
    column = offset - content.rfind(b"\n", 0, offset)
    loaded.problems.append(Problem(loaded.path, line, column, "", message, hint))


class _Stop(Exception):
    """The rest of the file cannot be read safely; carries the problem that says why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass(slots=True)
class _Frame:
    """A mapping or list being built."""

    path: Path
    container: list[Any] | dict[str, Any]
    positions: array[int]
    keep: bool  # False inside the value of a duplicate key: consumed, then dropped
    position: int
    key: str | None = None  # a mapping's key waiting for its value
    key_position: int = 0
    keep_value: bool = True
    key_lines: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _CidrRun:
    """One run of CIDR lines: libyaml reads its first line, the others are blanked."""

    line: int  # 0-based line of its first item
    column: int  # 0-based column of each item's value
    first: str  # the first item's value
    rest: tuple[int, int]  # where the blanked lines are in the text (start, end)
    count: int  # how many blanked lines
    claimed: bool = False


class _CidrRuns:
    """The long runs of CIDR lines of a text, and the text with all lines of each run but
    its first blanked out (left empty, so that every other line and column stays where it
    was). libyaml then reads a 10,000-CIDR list in a few events instead of 10,000 (8 ms
    less); the composer puts the blanked items back behind the first (:meth:`claim`,
    :meth:`values`).

    A run is put back only when libyaml reads its first item as a one-line string item
    of a list (in a flow list, "- " lines are a syntax error), and only when the reading
    found nothing wrong: a run that is something else (lines of a block scalar, of a
    quoted or plain string going on over several lines) changes that first value or
    leaves it unclaimed, and then the file is read again whole, as are files with
    problems. A text with other line breaks than \\n, or with more CIDR lines than a file
    may have nodes, is not blanked at all. A file read again costs one reading more."""

    def __init__(self, text: str) -> None:
        self.by_line: dict[int, _CidrRun] = {}
        self.original = self.text = text
        if _OTHER_BREAKS.search(text) is not None:
            return
        pieces: list[str] = []
        end = line = total = 0
        for found in _CIDR_RUN.finditer(text):
            start = found.start()
            line += text.count("\n", end, start)
            second = text.index("\n", start) + 1
            count = text.count("\n", second, found.end())
            total += count
            if total > MAX_NODES:  # the whole reading stops inside; no values made for it
                self.by_line = {}
                self.text = text
                return
            first = _CIDR_VALUE.findall(text, start, second)[0]
            pieces += (text[end:second], "\n" * count)
            self.by_line[line] = _CidrRun(
                line, found.end(1) - start + 2, first, (second, found.end()), count
            )
            end, line = found.end(), line + 1 + count
        if self.by_line:
            pieces.append(text[end:])
            self.text = "".join(pieces)

    def claim(self, items: list[Any], start: Any, end: Any) -> _CidrRun | None:
        """The run whose first item is the one just added to ``items``, read from the
        ``start`` to the ``end`` mark, if it is one."""
        run = self.by_line.get(start.line)
        if (
            run is None
            or start.column != run.column
            or end.line != run.line
            or items[-1] != run.first  # (the line leaves no room for a tag or an anchor)
        ):
            return None
        run.claimed = True
        return run

    def values(self, run: _CidrRun) -> list[str]:
        """The values of a run's blanked lines, in order."""
        return _CIDR_VALUE.findall(self.original, *run.rest)

    def all_claimed(self) -> bool:
        return all(run.claimed for run in self.by_line.values())


class _Abandon(Exception):
    """The blanked reading of a file cannot give the answer its whole reading gives."""


class _Composer:
    """Turns libyaml's events into documents with an explicit stack (no recursion)."""

    def __init__(self, loaded: LoadedFile, text: str) -> None:
        self.loaded = loaded
        self.text = text
        self._reset()

    def _reset(self) -> None:
        """Forget everything read so far, to read the file again from its start."""
        self.loaded.documents.clear()
        self.loaded.problems.clear()  # parsing starts only when reading and decoding had none
        self.stack: list[_Frame] = []
        self.nodes = 0
        self.collections = 0
        self.problem_count = 0
        self.document: Document | None = None
        self.resolver: Any = None
        self.stopped = False  # by one of our limits (a _Stop), not by a YAML error
        self.runs: _CidrRuns | None = None

    def run(self, content: bytes) -> None:
        """Read every document of `content` (the text's bytes), recording data and
        problems in `loaded`: with the text's long CIDR lists blanked out (_CidrRuns) when
        that gives the whole reading's answer, else whole."""
        runs = _CidrRuns(self.text)
        if runs.by_line:
            self.runs = runs
            try:
                whole = self._read_events(_Loader(runs.text.encode())) is None
            except _Abandon:
                whole = False
            if whole and runs.all_claimed() and not self._any_problem():
                return
            self._reset()
        self._read_whole(content)

    def _any_problem(self) -> bool:
        return bool(self.loaded.problems) or any(d.problems for d in self.loaded.documents)

    def _read_whole(self, content: bytes) -> None:
        """Read every document of `content`, recording data and problems in `loaded`.

        When libyaml's own depth limit (see _LIBYAML_DEPTH_LIMIT) ends the read, the answer
        must not depend on which libyaml is installed, so the file is read again as a
        scanner without that limit reads it. First by libyaml again, cut just before the
        level that exceeded its limit: no level there is too deep for it, and every event up
        to one of our stops is the same as in the whole file (a ':' that would make a key of
        something before our stop cannot come after the cut: libyaml looks ahead at most
        1024 characters for it, and from there it would first have to close the more than
        800 levels opened in between). Whatever else ends that read (e.g. a syntax error at
        the cut) may be an effect of the cut, so then the whole file is read by PyYAML's
        pure-Python parser, which is slower (seconds for 16 MiB) but has no limit.
        """
        cut = self._read_events(_Loader(content))
        if cut is None:
            return
        self._reset()
        if self._read_events(_Loader(self.text[:cut].encode())) is None and self.stopped:
            return
        self._reset()
        self._read_events(yaml.SafeLoader(content))

    def _read_events(self, parser: Any) -> int | None:
        """Compose documents from `parser`'s events; None, or the character offset at which
        libyaml's own depth limit stopped it (then nothing is recorded about that)."""
        self.resolver = parser
        handlers: dict[type, Callable[[Any], None]] = {
            yaml.ScalarEvent: self._scalar,
            yaml.MappingStartEvent: self._start,
            yaml.SequenceStartEvent: self._start,
            yaml.MappingEndEvent: self._end,
            yaml.SequenceEndEvent: self._end,
            yaml.AliasEvent: self._alias,
            yaml.DocumentStartEvent: self._start_document,
            yaml.DocumentEndEvent: self._finish_document,
        }
        get_event, scalar, scalar_type = parser.get_event, self._scalar, yaml.ScalarEvent
        try:
            while (event := get_event()) is not None:  # None after the stream's end
                if type(event) is scalar_type:  # most events: one lookup fewer
                    scalar(event)
                    continue
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(event)
        except _Stop as stop:
            self.stopped = True
            self.loaded.problems.append(stop.problem)
        except yaml.MarkedYAMLError as error:
            if error.problem == _LIBYAML_DEPTH_LIMIT and error.problem_mark is not None:
                return int(error.problem_mark.index)
            self.loaded.problems.append(self._syntax_problem(error))
        except yaml.YAMLError as error:
            self.loaded.problems.append(self._reader_problem(error))
        finally:
            parser.dispose()
        return None

    # -- nodes (the hot path: one call per scalar, so kept lean) --------------------------

    def _scalar(self, event: yaml.ScalarEvent) -> None:
        self.nodes += 1  # _count, inlined
        if self.nodes > MAX_NODES:
            self._stop(event, _TOO_MANY_NODES)
        if event.anchor is not None:
            self._anchor(event)
        frame = self.stack[-1] if self.stack else None
        if frame is None:
            self._value(self._construct(event), _mark(event.start_mark))
        elif type(frame.container) is list:
            # An item of a list (a policy may list 200,000 CIDRs): _value, inlined. A quoted
            # scalar without a tag is a string, as _construct would say.
            if event.tag is None and not event.implicit[0]:
                frame.container.append(event.value)
            else:
                frame.container.append(self._construct(event))
            mark: Any = event.start_mark  # always set by the parser (see _start)
            frame.positions.append((mark.line + 1) << 32 | (mark.column + 1))
            if self.runs is not None and mark.line in self.runs.by_line:
                self._put_back(frame, event)
        elif frame.key is None:
            self._key(frame, event)
        else:
            self._value(self._construct(event), _mark(event.start_mark))

    def _put_back(self, frame: _Frame, event: yaml.ScalarEvent) -> None:
        """After the first item of a blanked run, the others, as their events would have
        added them: a string each, at its own line and the first one's column."""
        assert self.runs is not None and isinstance(frame.container, list)
        run = self.runs.claim(frame.container, event.start_mark, event.end_mark)
        if run is None:
            return
        self.nodes += run.count
        if self.nodes > MAX_NODES:
            raise _Abandon  # the whole reading says at which item
        frame.container.extend(self.runs.values(run))
        column = run.column + 1
        frame.positions.extend(
            (line << 32 | column) for line in range(run.line + 2, run.line + 2 + run.count)
        )

    def _alias(self, event: yaml.AliasEvent) -> None:
        self._count(event)
        message = f"YAML aliases ('*{event.anchor}') are not allowed"
        self._problem(event, message, _NO_ALIASES_HINT)
        self._value(None, _mark(event.start_mark))

    def _key(self, frame: _Frame, event: yaml.ScalarEvent) -> None:
        key, position = event.value, _mark(event.start_mark)
        if key == "<<" and event.implicit[0]:
            self._problem(event, "YAML merge keys ('<<') are not allowed", _NO_ALIASES_HINT)
        first = frame.key_lines.get(key)
        if first is not None:
            self._problem(
                event,
                f"duplicate key {key!r}: first set on line {first >> 32}, again on line "
                f"{position >> 32}",
                "YAML would silently keep only the last one; remove one of them",
                path=frame.path + (key,),
            )
        else:
            frame.key_lines[key] = position
        frame.key, frame.key_position, frame.keep_value = key, position, first is None

    def _start(self, event: yaml.MappingStartEvent | yaml.SequenceStartEvent) -> None:
        self._count(event)
        if event.anchor is not None:
            self._anchor(event)
        if event.tag not in _COLLECTION_TAGS:
            self._problem(event, f"YAML tag {event.tag!r} is not allowed here")
        if len(self.stack) >= MAX_DEPTH:
            self._stop(event, f"nesting is deeper than {MAX_DEPTH} levels")
        self.collections += 1
        if self.collections > MAX_COLLECTIONS:
            self._stop(event, f"file has more than {MAX_COLLECTIONS:,} mappings and lists")
        parent = self.stack[-1] if self.stack else None
        path: Path = ()
        keep = True
        if parent is not None:
            if isinstance(parent.container, dict):
                if parent.key is None:
                    self._stop(event, "a mapping key must be a plain value, not a list or mapping")
                path = parent.path + (parent.key,)  # type: ignore[operator]
                keep = parent.keep and parent.keep_value
            else:
                path, keep = parent.path + (len(parent.container),), parent.keep
        container: list[Any] | dict[str, Any] = (
            {} if isinstance(event, yaml.MappingStartEvent) else []
        )
        self.stack.append(_Frame(path, container, array("Q"), keep, _mark(event.start_mark)))

    def _end(self, _event: yaml.Event) -> None:
        frame = self.stack.pop()
        if frame.keep and self.document is not None:
            self.document.source_map.add(frame.path, frame.positions, frame.container)
        self._value(frame.container, frame.position)

    def _value(self, value: Any, position: int) -> None:
        """Attach a finished node to the collection being built, or make it the root."""
        if not self.stack:
            if self.document is not None:
                self.document.data = value
                self.document.source_map.root = position
                self.document.line, self.document.column = position >> 32, position & 0xFFFFFFFF
            return
        frame = self.stack[-1]
        if isinstance(frame.container, list):
            frame.container.append(value)
            frame.positions.append(position)
        else:
            if frame.keep_value:
                frame.container[frame.key] = value  # type: ignore[index]
                frame.positions.extend((frame.key_position, position))
            frame.key = None

    def _construct(self, event: yaml.ScalarEvent) -> Any:
        """Only JSON-like values: str, int, float, bool, None."""
        tag = event.tag
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return event.value  # quoted or block scalar: always a string
            if _DECIMAL.match(event.value):
                return int(event.value)  # the common case, without the resolver's regexes
            tag = self.resolver.resolve(yaml.ScalarNode, event.value, (True, False))
            if tag not in _SCALAR_TAGS:
                return event.value  # timestamps and the like stay as written
        elif tag not in _SCALAR_TAGS:
            self._problem(event, f"YAML tag {tag!r} is not allowed here")
            return event.value
        if tag == _YAML_TAG + "str":
            return event.value
        if tag == _YAML_TAG + "int" and len(event.value) > MAX_NUMBER_CHARACTERS:
            return self._too_large(event)
        try:
            value = self.resolver.yaml_constructors[tag](
                self.resolver, yaml.ScalarNode(tag, event.value)
            )
        except (yaml.YAMLError, ValueError, KeyError, OverflowError):
            kind = tag.removeprefix(_YAML_TAG)
            self._problem(event, f"{shown(event.value)} cannot be read as {kind}")
            return event.value
        if isinstance(value, int) and value.bit_length() > MAX_NUMBER_BITS:
            return self._too_large(event)
        return value

    def _too_large(self, event: yaml.ScalarEvent) -> str:
        """A problem for a number no field could take; the text stays, as a string."""
        self._problem(event, f"the number {shown(event.value)} is too large for any field")
        return event.value

    # -- documents and limits -----------------------------------------------------------

    def _start_document(self, _event: yaml.Event) -> None:
        self.document = Document(len(self.loaded.documents), 0, 0, None, SourceMap())

    def _finish_document(self, _event: yaml.Event) -> None:
        document = self.document
        if document is None:
            return
        self.document = None
        self.loaded.documents.append(document)
        if document.data is None:
            document.problems.append(
                Problem(self.loaded.path, document.line, document.column, "", "document is empty")
            )
        elif not isinstance(document.data, dict):
            kind = "a list" if isinstance(document.data, list) else f"{document.data!r}"
            document.problems.append(
                Problem(
                    self.loaded.path,
                    document.line,
                    document.column,
                    "",
                    f"the top level of a policy must be a mapping, not {kind}",
                    "a policy starts with apiVersion, kind, metadata and spec",
                )
            )

    def _count(self, event: yaml.Event) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self._stop(event, _TOO_MANY_NODES)

    def _anchor(self, event: yaml.NodeEvent) -> None:
        message = f"YAML anchors ('&{event.anchor}') are not allowed"
        self._problem(event, message, _NO_ALIASES_HINT)

    def _problem(
        self, event: yaml.Event, message: str, hint: str | None = None, path: Path | None = None
    ) -> None:
        self.problem_count += 1
        if self.problem_count > MAX_PROBLEMS:
            self._stop(event, f"more than {MAX_PROBLEMS} problems; stopped reading the file")
        if path is None:
            path = self._current_path()
        line, column = _start(event)
        problem = Problem(self.loaded.path, line, column, field_name(path), message, hint)
        if self.document is not None:
            self.document.problems.append(problem)

    def _current_path(self) -> Path:
        if not self.stack:
            return ()
        frame = self.stack[-1]
        if isinstance(frame.container, list):
            return frame.path + (len(frame.container),)
        return frame.path if frame.key is None else frame.path + (frame.key,)

    def _stop(self, event: yaml.Event, message: str) -> None:
        line, column = _start(event)
        raise _Stop(Problem(self.loaded.path, line, column, "", message))

    def _syntax_problem(self, error: yaml.MarkedYAMLError) -> Problem:
        mark = error.problem_mark or error.context_mark
        message = f"invalid YAML: {error.problem or error.context}"
        if error.context and error.context_mark and error.problem:
            where = f"line {error.context_mark.line + 1}, column {error.context_mark.column + 1}"
            message += f" ({error.context} at {where})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        return Problem(self.loaded.path, line, column, "", message)

    def _reader_problem(self, error: yaml.YAMLError) -> Problem:
        position = getattr(error, "position", None)
        if not isinstance(position, int):
            return Problem(self.loaded.path, 0, 0, "", f"invalid YAML: {error}")
        line = self.text.count("\n", 0, position) + 1
        column = position - self.text.rfind("\n", 0, position)
        character = getattr(error, "character", None)
        shown = f"U+{character:04X}" if isinstance(character, int) else repr(character)
        reason = getattr(error, "reason", "invalid character")
        return Problem(self.loaded.path, line, column, "", f"invalid YAML: {reason} ({shown})")

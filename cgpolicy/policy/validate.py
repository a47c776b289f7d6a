"""Load policy files and report every problem in them, each at FILE:LINE:COL.

Stages, per YAML document: safe loading (:mod:`loader`), the JSON Schema in
``schemas/policy.schema.json`` (the contract), the semantic checks (:mod:`semantic`), then
names unique across all documents. A :class:`Policy` is built only for a document with no
problems. Importing this module must stay cheap: nothing here touches the kernel.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from functools import cache
from itertools import islice
from pathlib import Path as FsPath
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from cgpolicy.policy.build import build_policy
from cgpolicy.policy.gcpause import gc_paused
from cgpolicy.policy.loader import MAX_FILE_BYTES, MAX_PROBLEMS, Document, load_file
from cgpolicy.policy.model import Policy, SourceLocation
from cgpolicy.policy.problems import Path, PolicyError, Problem, field_name, shown
from cgpolicy.policy.semantic import (
    InvalidValue,
    check_policy,
    duplicate_name,
    end_of_load,
    policy_warnings,
)
from cgpolicy.policy.sourcemap import SourceMap
from cgpolicy.policy.splice import CidrList, cidr_lists, splice

__all__ = [
    "FileMemo",
    "LoadResult",
    "PolicyError",
    "Problem",
    "load_contents",
    "load_paths",
    "load_policy_file",
]

log = logging.getLogger(__name__)

SCHEMA_PATH = FsPath(__file__).resolve().parents[2] / "schemas" / "policy.schema.json"
POLICY_SUFFIXES = (".yaml", ".yml")
# The kind of a `cgpolicy test` file (docs/testing.md): it may sit beside policies, in the
# same folder; loading skips its documents, and says so (LoadResult.skipped).
TEST_KIND = "CgroupPolicyTest"

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


@dataclass
class LoadResult:
    """Every policy that loaded cleanly, every problem found, and the files read."""

    policies: list[Policy] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # about valid policies: what they may not do as an operator expects; not a failure
    warnings: list[Problem] = field(default_factory=list)
    # `cgpolicy test` documents found in a folder: not policies, skipped (and reported)
    skipped: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_paths(paths: Sequence[str | os.PathLike[str]]) -> LoadResult:
    """Load files and folders. A folder means every ``*.yaml``/``*.yml`` file directly in
    it (not in subfolders), in name order. Never raises for bad input: a missing path,
    an unreadable file and an invalid document are all problems in the result."""
    try:
        with gc_paused():
            return _load_paths(paths)
    finally:
        end_of_load()


@dataclass
class _Checked:
    """One document of a file, checked alone (before names are compared across files)."""

    name: str | None
    where: SourceLocation | None  # of its metadata.name
    problems: list[Problem]  # the loader's, the schema's and the semantic ones
    built: Policy | None  # when it has none of those and building it worked
    build_problems: list[Problem]  # when building it failed
    cidrs: tuple[CidrList, ...] = ()  # where the built policy's CIDR items are (splice.py)


@dataclass
class _CheckedFile:
    documents: list[_Checked]
    skipped: list[Problem]  # `cgpolicy test` documents
    trailing: list[Problem]  # where reading stopped: after every document


class FileMemo:
    """Each file's documents as checked alone, by file name and content: a reading in which
    one file of many changed checks that file only (the reconcile service reads its whole
    folder at every change), and gives the same Policy objects for the others, so that
    what was compiled from them is reused. A file whose change only rewrote CIDR items is
    not read again whole either (policy/splice.py). Names are compared across all files at
    every reading, as without the memo."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, _CheckedFile]] = {}

    def get(self, file: str, content: bytes) -> _CheckedFile | None:
        known = self._files.get(file)
        if known is None:
            return None
        if known[0] == content:
            return known[1]
        return _spliced(known[0], known[1], content)

    def keep(self, checked: dict[str, tuple[bytes, _CheckedFile]]) -> None:
        """Remember exactly these (the files of the last reading)."""
        self._files = checked


def load_contents(files: Sequence[tuple[str, bytes]], memo: FileMemo | None = None) -> LoadResult:
    """Like :func:`load_paths`, for files whose bytes the caller has read itself (the
    reconcile service does, to refuse what is not a regular file): each ``(name, bytes)``
    is validated under its name, which is not opened, and names must be unique across all
    of them. With ``memo``, a file whose name and bytes it holds is not checked again."""
    try:
        result = LoadResult()
        with gc_paused():
            _load_into(result, files, memo=memo)
        return result
    finally:
        end_of_load()


def _load_paths(paths: Sequence[str | os.PathLike[str]]) -> LoadResult:
    result = LoadResult()
    named = {os.fspath(path) for path in paths}
    _load_into(result, ((file, None) for file in _expand(paths, result.problems)), named)
    return result


def _load_into(
    result: LoadResult,
    files: Iterable[tuple[str, bytes | None]],
    named: set[str] | None = None,
    memo: FileMemo | None = None,
) -> None:
    """``named``: the files given by name (not found in a folder): one that holds only
    `cgpolicy test` documents is a problem there, not a skipped file. ``memo``: see
    :class:`FileMemo` (for files whose bytes are given)."""
    first_use: dict[str, SourceLocation] = {}
    checked_now: dict[str, tuple[bytes, _CheckedFile]] = {}
    for file, content in files:
        result.files.append(file)
        policies: list[Policy] = []
        try:
            checked = memo.get(file, content) if memo is not None and content else None
            if checked is None:
                checked = _check_file(file, content)
            if content is not None:
                checked_now[file] = (content, checked)
            problems = _unique_names(checked, first_use, policies)
            skipped = list(checked.skipped)
        except Exception as error:  # noqa: BLE001 - a bug costs this file, not the others
            log.debug("checking %s failed", file, exc_info=True)  # the traceback, on request
            problems, policies, skipped = [_unchecked(file, error)], [], []
        if skipped and not policies and not problems and named is not None and file in named:
            first = skipped[0]
            problems = [
                Problem(
                    file,
                    first.line,
                    first.column,
                    "kind",
                    f"holds a {TEST_KIND} (test cases), not a policy",
                    f"run it with `cgpolicy test {file}`",
                )
            ]
            skipped = []
        result.policies += policies
        result.problems += problems
        result.skipped += skipped
        result.warnings += [w for policy in policies for w in policy_warnings(policy)]
    if memo is not None:
        memo.keep(checked_now)


def _spliced(old: bytes, checked: _CheckedFile, new: bytes) -> _CheckedFile | None:
    """``checked`` made for ``new`` by :func:`splice`, when that can be done."""
    if checked.trailing or len(new) > MAX_FILE_BYTES:
        return None
    built = [(i, d) for i, d in enumerate(checked.documents) if d.built is not None and d.cidrs]
    if not built:
        return None
    items = _item_check()
    if items is None:
        return None
    documents = [(d.built, d.cidrs) for _, d in built if d.built is not None]
    made = splice(old, new, documents, items)
    if made is None:
        return None
    spliced = list(checked.documents)
    for (i, document), (policy, cidrs) in zip(built, made, strict=True):
        spliced[i] = dataclasses.replace(document, built=policy, cidrs=cidrs)
    return _CheckedFile(spliced, checked.skipped, checked.trailing)


@cache
def _item_check() -> Callable[[Any], bool] | None:
    """The schema's check of one `cidrs` item, when it is one :func:`_string_check` can
    make (else no file is spliced)."""
    return _string_check(_validator().schema.get("$defs", {}).get("cidrs", {}).get("items"))


def _check_file(file: str, content: bytes | None) -> _CheckedFile:
    """One file's documents, each checked alone and built if it has no problem; a note for
    each `cgpolicy test` document (not a policy)."""
    checked = _CheckedFile([], [], [])
    loaded = load_file(file, content)
    for document in loaded.documents:
        if _is_test(document.data):
            checked.skipped.append(
                Problem(
                    file,
                    document.line,
                    document.column,
                    "kind",
                    f"a {TEST_KIND} document (test cases for `cgpolicy test`), not a "
                    "policy: skipped",
                )
            )
            continue
        problems = _check_document(file, document)
        name = _name(document.data)
        where = (
            SourceLocation(file, *document.source_map.locate(("metadata", "name")))
            if name is not None
            else None
        )
        built: list[Policy] = []
        build_problems = [] if problems else _build(file, document, built)
        cidrs = cidr_lists(document.source_map) if built else ()
        checked.documents.append(
            _Checked(name, where, problems, built[0] if built else None, build_problems, cidrs)
        )
    checked.trailing = loaded.problems
    return checked


def _unique_names(
    checked: _CheckedFile, first_use: dict[str, SourceLocation], policies: list[Policy]
) -> list[Problem]:
    """A checked file's problems, with a name used before (``first_use``) one of them; its
    policies, if they have none, are appended to ``policies``."""
    problems: list[Problem] = []
    for document in checked.documents:
        found = list(document.problems)
        if document.name is not None and document.where is not None:
            if document.name in first_use:
                found.append(
                    duplicate_name(document.name, document.where, first_use[document.name])
                )
            else:
                first_use[document.name] = document.where
        if not found:
            found = document.build_problems
            if document.built is not None:
                policies.append(document.built)
        problems += found
    return problems + checked.trailing  # reading stopped there: after every document


def _unchecked(file: str, error: Exception) -> Problem:
    """The problem for a file whose checking raised: a bug in cgpolicy, which must cost
    only this file (the reconcile service keeps its last good version, as for any problem)."""
    reason = shown(str(error), 200)
    return Problem(
        file,
        0,
        0,
        "",
        f"the file could not be checked: {type(error).__name__}: {reason}",
        "this is a bug in cgpolicy; please report it with the file",
    )


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Exactly one valid policy from one file, or PolicyError with every problem."""
    result = load_paths([path])
    if result.problems:
        raise PolicyError(result.problems)
    if len(result.policies) != 1:
        count = len(result.policies)
        message = f"expected exactly one policy in the file, found {count}"
        raise PolicyError([Problem(os.fspath(path), 0, 0, "", message)])
    return result.policies[0]


def _expand(paths: Iterable[str | os.PathLike[str]], problems: list[Problem]) -> Iterator[str]:
    """Files to read, each once even when named twice (a folder and a file in it)."""
    seen: set[str] = set()
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            files = _folder(path, problems)
        elif os.path.lexists(path):
            files = [path]
        else:
            problems.append(Problem(path, 0, 0, "", "no such file or folder"))
            continue
        for file in files:
            real = os.path.realpath(file)
            if real not in seen:
                seen.add(real)
                yield file


def _folder(path: str, problems: list[Problem]) -> list[str]:
    try:
        with os.scandir(path) as entries:
            files = sorted(
                entry.path
                for entry in entries
                if entry.name.endswith(POLICY_SUFFIXES) and entry.is_file()
            )
    except OSError as error:
        problems.append(Problem(path, 0, 0, "", f"cannot read the folder: {error.strerror}"))
        return []
    if not files:
        problems.append(Problem(path, 0, 0, "", "folder holds no *.yaml or *.yml file"))
    return files


def _build(file: str, document: Document, policies: list[Policy]) -> list[Problem]:
    """Build the policy; a device node that vanished since it was checked is a problem."""
    try:
        policies.append(build_policy(document.data, document.source_map, file))
    except InvalidValue as error:
        return [Problem(file, document.line, document.column, "", error.message, error.hint)]
    return []


def _is_test(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == TEST_KIND


def _name(data: Any) -> str | None:
    metadata = data.get("metadata") if isinstance(data, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) else None


def _check_document(file: str, document: Document) -> list[Problem]:
    """The loader's, the schema's and the semantic problems of one document, capped."""
    problems = list(document.problems)
    if not isinstance(document.data, dict):
        return problems
    place = _placer(file, document.source_map)
    # A value the loader refused (a number too large to read, an alias) is reported once,
    # by the loader: what the schema and the checks would add about it is only an echo.
    refused = {problem.field for problem in problems if problem.field}
    errors = _validator().iter_errors(document.data)
    schema = [
        problem
        for error in islice(errors, MAX_PROBLEMS)
        for path, message, hint, key in _explain(error)
        if (problem := place(path, message, hint, key)).field not in refused
    ]
    seen = refused | {problem.field for problem in schema}
    findings = check_policy(document.data)
    semantic = [
        place(finding.path, finding.message, finding.hint, False)
        for finding in islice(findings, MAX_PROBLEMS)
        if field_name(finding.path) not in seen
    ]
    problems += list(dict.fromkeys(schema)) + semantic  # 'required' repeats per missing field
    problems.sort(key=lambda problem: (problem.line, problem.column))
    if next(errors, None) is not None or next(findings, None) is not None:
        summary = (
            f"more problems in this document are not shown (at most {MAX_PROBLEMS} of each kind)"
        )
        problems.append(Problem(file, document.line, document.column, "", summary))
    return problems


Placer = Callable[[Path, str, str | None, bool], Problem]


def _placer(file: str, source_map: SourceMap) -> Placer:
    def place(path: Path, message: str, hint: str | None, key: bool) -> Problem:
        line, column = source_map.locate(path, key=key)
        return Problem(file, line, column, field_name(path), message, hint)

    return place


# -- the schema ----------------------------------------------------------------------------


def _fast_items(validator: Any, items: Any, instance: Any, schema: dict[str, Any]) -> Any:
    """The standard 'items' keyword, with a fast path for lists of plain strings: a policy
    may list 100,000 CIDRs, and descending into each costs about 4 us. Items that fail the
    quick test go through the standard path, so messages are unchanged."""
    check = _string_check(items) if isinstance(instance, list) else None
    if check is None or "prefixItems" in schema:
        yield from _STANDARD_ITEMS(validator, items, instance, schema)
        return
    for index, item in enumerate(instance):
        if not check(item):
            yield from validator.descend(item, items, path=index)


def _string_check(items: Any) -> Callable[[Any], bool] | None:
    if not isinstance(items, dict) or items.get("type") != "string":
        return None
    if not set(items) <= {"type", "minLength", "maxLength", "pattern", "description"}:
        return None
    low, high = items.get("minLength", 0), items.get("maxLength", float("inf"))
    search = re.compile(items.get("pattern", "")).search

    def check(item: Any) -> bool:
        return isinstance(item, str) and low <= len(item) <= high and search(item) is not None

    return check


_STANDARD_ITEMS = Draft202012Validator.VALIDATORS["items"]
_PolicyValidator = validators.extend(Draft202012Validator, {"items": _fast_items})


@cache
def _validator() -> Any:
    return schema_validator(SCHEMA_PATH)


@cache
def schema_validator(path: FsPath) -> Any:
    """A validator of the JSON Schema at ``path`` (other files cgpolicy reads: tests)."""
    return _PolicyValidator(json.loads(path.read_text(encoding="utf-8")))


def schema_problems(file: str, document: Document, validator: Any) -> list[Problem]:
    """What ``validator`` finds wrong in a document, placed at FILE:LINE:COL and worded
    as policy problems are, sorted by place; the loader's own problems first."""
    problems = list(document.problems)
    refused = {problem.field for problem in problems if problem.field}
    place = _placer(file, document.source_map)
    found = [
        problem
        for error in islice(validator.iter_errors(document.data), MAX_PROBLEMS)
        for path, message, hint, key in _explain(error)
        if (problem := place(path, message, hint, key)).field not in refused
    ]
    return problems + sorted(dict.fromkeys(found), key=lambda p: (p.line, p.column))


# -- schema errors, in an operator's words -------------------------------------------------

Explained = tuple[Path, str, str | None, bool]  # path, message, hint, point at the key


def _explain(error: ValidationError) -> list[Explained]:
    path: Path = tuple(error.absolute_path)
    if error.validator in ("anyOf", "oneOf") and error.context:
        return _explain(_best(error.context))
    if error.validator == "additionalProperties":
        return _unknown_fields(error, path)
    if error.validator == "required":
        assert isinstance(error.validator_value, Iterable), error.validator_value
        return [
            (path, f"missing required field {name!r}", None, False)
            for name in error.validator_value
            if isinstance(error.instance, dict) and name not in error.instance
        ]
    explain = _EXPLAINERS.get(str(error.validator))
    message, hint = explain(error) if explain else (error.message, None)
    return [(path, message, hint, False)]


def _best(errors: list[ValidationError]) -> ValidationError:
    """Prefer a branch that failed on content over one that failed on type."""
    content = [error for error in errors if error.validator != "type"]
    return best_match(content or errors) or errors[0]


def _unknown_fields(error: ValidationError, path: Path) -> list[Explained]:
    known = sorted(_schema(error).get("properties", {}))
    assert isinstance(error.instance, Iterable), error.instance  # the mapping with the fields
    found: list[Explained] = []
    for name in error.instance:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
        found.append((path + (name,), f"unknown field {shown(name)}", hint, True))
    return found


def _schema(error: ValidationError) -> Mapping[str, Any]:
    """The schema object holding the keyword that failed. The stubs also allow a boolean
    schema and jsonschema's marker for a field not given: an error that validation yields
    for a keyword always comes from a schema object."""
    assert isinstance(error.schema, Mapping), error.schema
    return error.schema


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kind = {dict: "a mapping", list: "a list", str: "the string", int: "the number"}
    for python_type, name in kind.items():
        if isinstance(value, python_type):
            return name if python_type in (dict, list) else f"{name} {shown(value)}"
    return repr(value)


def _type(error: ValidationError) -> tuple[str, str | None]:
    declared = error.validator_value  # "string", or a list such as ["string", "null"]
    wanted: list[str] = declared if isinstance(declared, list) else [str(declared)]
    expected = " or ".join(_TYPE_NAMES.get(name, name) for name in wanted)
    hint = None
    if isinstance(error.instance, bool) and "string" in wanted:
        hint = "YAML reads yes/no/on/off/true/false as booleans; quote the value"
    elif error.instance is None:
        hint = "a key with nothing after the colon is null; give it a value or remove it"
    return f"expected {expected}, not {_describe(error.instance)}", hint


def _enum(error: ValidationError) -> tuple[str, str | None]:
    assert isinstance(error.validator_value, Iterable), error.validator_value
    choices = [str(choice) for choice in error.validator_value]
    close = difflib.get_close_matches(str(error.instance), choices, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else None
    if hint is None:  # the schema says why the choices are what they are (socket families)
        hint = _schema(error).get("description")
    if isinstance(error.instance, bool):
        hint = "YAML reads yes/no/on/off/true/false as booleans; quote the value"
    return f"{_describe(error.instance)} is not one of: {', '.join(choices)}", hint


def _const(error: ValidationError) -> tuple[str, str | None]:
    return f"must be {error.validator_value!r}, not {_describe(error.instance)}", None


def _pattern(error: ValidationError) -> tuple[str, str | None]:
    expected = _schema(error).get("description") or f"a match for {error.validator_value}"
    return f"{shown(error.instance)} is not valid: expected {expected}", None


def _size(error: ValidationError) -> tuple[str, str | None]:
    assert isinstance(error.instance, Sized), error.instance
    limit, count = error.validator_value, len(error.instance)
    unit = "characters" if isinstance(error.instance, str) else "items"
    if str(error.validator).startswith("min"):
        if limit == 1:
            return "must not be empty", None
        return f"has {count} {unit}; at least {limit} are needed", None
    return f"has {count:,} {unit}; at most {limit:,} are allowed", None


def _range(error: ValidationError) -> tuple[str, str | None]:
    low, high = _schema(error).get("minimum"), _schema(error).get("maximum")
    if low is not None and high is not None:
        return f"{shown(error.instance)} is out of range {low}-{high}", None
    return error.message, None


def _properties(error: ValidationError) -> tuple[str, str | None]:
    schema = _schema(error)
    names = ", ".join(schema.get("properties", {}))
    if schema.get("minProperties") == schema.get("maxProperties") == 1:
        return f"needs exactly one of: {names}", None
    if error.validator == "minProperties":
        return f"needs at least one of: {names}", None
    return f"may set only {error.validator_value} of: {names}", None


_EXPLAINERS: dict[str, Callable[[ValidationError], tuple[str, str | None]]] = {
    "type": _type,
    "enum": _enum,
    "const": _const,
    "pattern": _pattern,
    "minItems": _size,
    "maxItems": _size,
    "minLength": _size,
    "maxLength": _size,
    "minimum": _range,
    "maximum": _range,
    "minProperties": _properties,
    "maxProperties": _properties,
}

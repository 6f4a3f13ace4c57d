"""The JSON Schemas of `extract` routes: checked when the config loads, carried as canonical text, named, and
checked again against every answer.

The check at load is deliberately narrower than JSON Schema: only keywords the decoding grammar honours
exactly are accepted, so "valid by construction" holds for every schema that loads. A schema built to
exhaust the grammar compiler (references, which may recurse; enums of thousands of values; deep nesting) is
refused with the route and the keyword named, instead of stalling the engine on its first event.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import llguidance

from streamer.errors import StreamerError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

SUPPORTED = frozenset({
    "$id", "$schema", "title", "description", "examples", "type", "properties", "required",
    "additionalProperties", "items", "enum", "const", "anyOf", "minLength", "maxLength", "pattern", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
})
"""Keywords the grammar enforces (or that only annotate); `$ref` is not among them: it may recurse."""
MAX_ENUM = 256
MAX_DEPTH = 8
MAX_PROPERTIES = 64
MAX_SCHEMA_BYTES = 65_536
MAX_PATTERN_CHARS = 256
MAX_REPEAT = 100
"""Largest count in a pattern's `{n,m}`: nested counts multiply into more expressions than the grammar's lexer
builds (`(.{1,1000}){1,1000}` loaded, then broke every answer); `maxLength` bounds a string's length instead."""
INTEGER_DIGITS = 18
"""Integers are decoded with at most this many digits (the grammar is given the bounds), so every one fits the
64 bits the output's JSON encoder holds; a 30-digit integer was valid, then dead-lettered `unserializable`."""
_INTEGER_BOUND = 10**INTEGER_DIGITS - 1
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_DIALECT = ("[:", "&&", "~~", "--")
"""Regex syntax the grammar's engine reads as POSIX classes or set operations and Python's `re` (the check of
every answer) as literal characters: a pattern using it loads, then every answer fails the check."""
_SUBSCHEMA_MAPS = ("properties",)
_SUBSCHEMA_ONE = ("items", "additionalProperties")
_SUBSCHEMA_LISTS = ("anyOf",)
_COMPILE_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON (no whitespace between tokens): fewer tokens, and no run of blank lines a small model can fall into."""


class SchemaError(StreamerError):
    """An extract route's schema cannot be used; the message names what and where."""


class InvalidOutput(StreamerError):
    """An answer that does not match its route's schema (a dead letter `invalid_output`)."""


@dataclass(frozen=True)
class ExtractSchema:
    """One route's schema: its canonical text (what requests carry, and the compiled grammars' cache key)."""

    text: str
    """Compact JSON in the author's key order (the grammar writes properties in that order)."""
    id: str
    """Its `$id`, else `sha256:` and the first 16 hex digits of its canonical text's hash."""

    @classmethod
    def load(cls, source: str | Mapping[str, Any], base: Path | None = None) -> ExtractSchema:
        """A schema given inline (a mapping) or as a path to a JSON file (relative to `base`), checked."""
        schema = dict(source) if isinstance(source, Mapping) else _read(source, base)
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)  # key order kept: it is the answer's
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the schema is {len(text.encode())} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
        check(schema)
        named = schema.get("$id")
        return cls(text, named if isinstance(named, str) and named else
                   "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16])

    @cached_property
    def document(self) -> dict[str, Any]:
        """The schema itself, parsed once (prompts read its properties for every event)."""
        parsed: dict[str, Any] = json.loads(self.text)
        return parsed

    @property
    def grammar(self) -> str:
        """The decoding grammar (llguidance's), compact JSON, integers bounded to INTEGER_DIGITS."""
        return _grammar(self.document)

    @cached_property
    def _validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(self.document)

    def parse(self, text: str) -> dict[str, Any]:
        """The answer's object, or InvalidOutput saying why it is not one this schema accepts."""
        try:
            value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
        except ValueError as exc:
            raise InvalidOutput(f"the answer is not JSON ({exc}): {text[:200]!r}") from None
        errors = sorted(self._validator.iter_errors(value), key=str)
        if errors:
            where = "/".join(str(part) for part in errors[0].absolute_path) or "the object"
            raise InvalidOutput(f"the answer does not match schema {self.id} at {where}: {errors[0].message}")
        assert isinstance(value, dict)  # check() made the root an object
        return value


def check(schema: Mapping[str, Any]) -> None:
    """Refuse a schema the grammar cannot honour exactly, or that is built to exhaust it."""
    try:
        jsonschema.Draft202012Validator.check_schema(dict(schema))
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"not a valid JSON Schema: {exc.message}") from None
    if schema.get("type") != "object":
        raise SchemaError('the schema\'s root must be `"type": "object"` (an answer is one JSON object)')
    for path, node in _nodes(schema, "#", 0):
        _check_node(path, node)
    problem = llguidance.LLMatcher.validate_grammar(_grammar(dict(schema)))
    if problem:
        raise SchemaError(f"the grammar compiler refused it: {problem}")


def _check_node(path: str, node: Mapping[str, Any]) -> None:
    unsupported = sorted(set(node) - SUPPORTED)
    if unsupported:
        hint = " (references may recurse; write the sub-schema inline)" if "$ref" in unsupported else ""
        raise SchemaError(f"unsupported keyword {unsupported[0]!r} at {path}{hint}; supported: "
                          f"{', '.join(sorted(SUPPORTED))}")
    if len(node.get("enum", ())) > MAX_ENUM:
        raise SchemaError(f"the enum at {path} has {len(node['enum'])} values; at most {MAX_ENUM} are accepted")
    if len(node.get("properties", {})) > MAX_PROPERTIES:
        raise SchemaError(f"{path} has {len(node['properties'])} properties; at most {MAX_PROPERTIES} are accepted")
    pattern = node.get("pattern", "")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaError(f"the pattern at {path} is longer than {MAX_PATTERN_CHARS} characters")
    if any(syntax in pattern for syntax in _DIALECT):
        raise SchemaError(f"the pattern at {path} uses {', '.join(repr(s) for s in _DIALECT if s in pattern)}: POSIX "
                          "classes and set operations read differently in the grammar and in JSON Schema's check")
    if any(int(count) > MAX_REPEAT for match in _REPEAT.finditer(pattern) for count in match.groups() if count):
        raise SchemaError(f"the pattern at {path} repeats more than {MAX_REPEAT} times in one {{n,m}}; bound the "
                          "string with maxLength instead")


def _grammar(schema: dict[str, Any]) -> str:
    return str(llguidance.LLMatcher.grammar_from_json_schema(_bounded(schema), defaults=_COMPILE_OPTIONS))


def _bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every integer given bounds of INTEGER_DIGITS digits (tighter ones it has are kept)."""
    bounded = copy.deepcopy(schema)
    for _, node in _nodes(bounded, "#", 0):
        kinds = node.get("type")
        if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
            assert isinstance(node, dict)
            node["minimum"] = max(node.get("minimum", -_INTEGER_BOUND), -_INTEGER_BOUND)
            node["maximum"] = min(node.get("maximum", _INTEGER_BOUND), _INTEGER_BOUND)
    return bounded


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > INTEGER_DIGITS:
        raise ValueError(f"an integer of more than {INTEGER_DIGITS} digits")
    return int(digits)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} does not fit a double")
    return value


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _nodes(node: Mapping[str, Any], path: str, depth: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every sub-schema with its JSON pointer, refusing nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise SchemaError(f"{path} is nested deeper than {MAX_DEPTH} levels")
    yield path, node
    for keyword in _SUBSCHEMA_MAPS:
        for name, sub in node.get(keyword, {}).items():
            yield from _nodes(sub, f"{path}/{keyword}/{name}", depth + 1)
    for keyword in _SUBSCHEMA_ONE:
        if isinstance(sub := node.get(keyword), Mapping):
            yield from _nodes(sub, f"{path}/{keyword}", depth + 1)
    for keyword in _SUBSCHEMA_LISTS:
        for n, sub in enumerate(node.get(keyword, ())):
            yield from _nodes(sub, f"{path}/{keyword}/{n}", depth + 1)


def _read(source: str, base: Path | None) -> dict[str, Any]:
    path = Path(source).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        loaded = json.loads(path.read_text())
    except OSError as exc:
        raise SchemaError(f"cannot read the schema file {str(path)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SchemaError(f"the schema file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise SchemaError(f"the schema file {str(path)!r} holds {type(loaded).__name__}, not a JSON object")
    return loaded

"""`extract` routes at config load: a schema the grammar cannot honour exactly, or one built to exhaust it, fails
the start with the route and the keyword named; a good one is named by its `$id` or a hash; answers are checked
against it again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.config import Route, load_settings
from streamer.errors import ConfigError
from streamer.tasks.event import TASKS, output_text, route_tasks
from streamer.tasks.schemas import ExtractSchema, InvalidOutput

TICKET = Path(__file__).parents[2] / "examples" / "schemas" / "support_ticket.json"
OK = {"type": "object", "properties": {"mood": {"enum": ["calm", "angry"]}}, "required": ["mood"]}


def load(tmp_path: Path, schema: Any, **route: Any) -> Route:
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump({"routes": [{"name": "tickets", "input": "in", "output": "out", "task": "extract",
                                                "schema": schema, **route}]}, sort_keys=False))
    return load_settings(path).routes[0]


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"x": node}}
    return node


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "object", "properties": {"child": {"$ref": "#"}}}, ["'$ref'", "#/properties/child", "recurse"]),
    ({"type": "object", "$defs": {"n": {"type": "string"}}}, ["'$defs'", "at #"]),
    ({"type": "object", "properties": {"a": {"enum": [f"v{i}" for i in range(5000)]}}},
     ["#/properties/a", "5000 values", "256"]),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, ["'format'", "#/properties/a"]),
    ({"type": "object", "oneOf": [{"required": ["a"]}]}, ["'oneOf'"]),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, ["'not'"]),
    ({"type": "object", "patternProperties": {"^x": {}}}, ["'patternProperties'"]),
    (nested(12), ["nested deeper than 8"]),
    ({"type": "array", "items": {"type": "string"}}, ['"type": "object"']),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, ["not a valid JSON Schema"]),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}, ["not a valid JSON Schema"]),
], ids=["recursive", "defs", "huge-enum", "format", "oneOf", "not", "patternProperties", "deep", "not-object",
        "bad-type", "bad-pattern"])
def test_a_hostile_or_unsupported_schema_fails_the_load_naming_the_route_and_why(tmp_path: Path, schema: Any,
                                                                                  words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, schema)
    message = str(caught.value)
    assert "routes.0" in message and "route 'tickets': schema:" in message
    for word in words:
        assert word in message


def test_a_schema_file_is_read_beside_the_config_and_named_by_its_id(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "ticket.json").write_text(TICKET.read_text())
    route = load(tmp_path, "schemas/ticket.json")
    assert route.schema_spec is not None and route.schema_spec.id == "support-ticket/v1"
    assert list(json.loads(route.schema_spec.text)["properties"]) == ["product", "sentiment", "urgency", "order_id"]


def test_an_inline_schema_without_id_is_named_by_its_hash(tmp_path: Path) -> None:
    spec = load(tmp_path, OK).schema_spec
    assert spec is not None and spec.id.startswith("sha256:") and len(spec.id) == len("sha256:") + 16
    two = {"a": {"type": "integer"}, "b": {"type": "integer"}}
    ab = load(tmp_path, {"type": "object", "properties": two}).schema_spec
    ba = load(tmp_path, {"type": "object", "properties": dict(reversed(two.items()))}).schema_spec
    assert ab is not None and ba is not None and ab.id != ba.id  # the order of properties is the answer's: kept


def test_a_missing_or_unreadable_schema_file_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the schema file"):
        load(tmp_path, "nowhere.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="holds list, not a JSON object"):
        load(tmp_path, "list.json")


def test_an_extract_route_needs_a_schema_and_a_route_with_one_offers_extract(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an `extract` route needs a `schema`"):
        load(tmp_path, None)
    answering = Route(name="r", input="i", output="o", schema=OK)
    assert route_tasks(answering) == {"answer", "translate", "extract"}


@pytest.mark.parametrize(("route", "message"), [
    ({"count_field": "mood"}, "the route needs a `window`"),
    ({"count_field": "note", "window": {"size_ms": 1000, "output": "w"}}, "an `enum`"),
    ({"task": "answer", "count_field": "mood", "window": {"size_ms": 1000, "output": "w"}}, "answers are text"),
])
def test_count_field_names_an_enum_property_of_a_windowed_extract_route(tmp_path: Path, route: dict[str, Any],
                                                                        message: str) -> None:
    schema = {**OK, "properties": {**OK["properties"], "note": {"type": "string"}}}
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, schema, **route)


def test_a_windowed_extract_route_counts_its_field_and_nothing_for_null(tmp_path: Path) -> None:
    route = load(tmp_path, OK, count_field="mood", window={"size_ms": 1000, "output": "w"})
    tally = TASKS["extract"].tally(route)
    assert tally is not None and tally({"mood": "calm"}) == "calm" and tally({"mood": None}) is None


def test_answers_are_checked_against_the_schema_again() -> None:
    spec = ExtractSchema.load(json.loads(TICKET.read_text()))
    good = {"product": "phone", "sentiment": "negative", "urgency": "high", "order_id": "AB-12345"}
    assert spec.parse(json.dumps(good)) == good
    with pytest.raises(InvalidOutput, match="not JSON"):
        spec.parse('{"product": "phone", "sentiment"')  # cut by the token cap
    with pytest.raises(InvalidOutput, match="at urgency"):
        spec.parse(json.dumps({**good, "urgency": "whenever"}))  # a server that ignored response_format
    with pytest.raises(InvalidOutput, match="the object"):
        spec.parse(json.dumps({"product": "phone"}))
    assert output_text(good) == json.dumps(good, separators=(",", ":"))

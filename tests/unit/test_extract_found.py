"""What the adversarial review of `task: extract` found (RELIABILITY.md, table X), each as the behaviour it
demands. Each test fails on the code the review read."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson
import pytest
import torch

from streamer.config import Route, Settings
from streamer.contracts import Answer, DeadLetter, ErrorCode, InputEvent
from streamer.engine.backend import Generated
from streamer.engine.engine import Engine, EngineConfig, TokenRequest
from streamer.engine.grammar import Constraint, Grammars, allow_only
from streamer.engine.requests import GenRequest, GenResult
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model
from streamer.pipeline.reuse import digest
from streamer.tasks.event import TASKS
from streamer.tasks.schemas import ExtractSchema, InvalidOutput
from tests.tiny import save_tiny_llama
from tests.unit.test_event_parts import NOW_MS, Handler, window

AMOUNTS = {"type": "object", "additionalProperties": False, "required": ["order_id", "amount", "urgency"],
           "properties": {"order_id": {"type": "integer"}, "amount": {"type": "number"},
                          "urgency": {"enum": ["low", "high"]}}}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> LLMWorker:
    directory = save_tiny_llama(tmp_path_factory.mktemp("tiny-found"), extra_chars="{}[]")
    return LLMWorker(load_model(directory, device="cpu", dtype="float32"))


def loads(schema: dict[str, Any]) -> ExtractSchema:
    settings = Settings(routes=[{"name": "r", "input": "in", "output": "out", "task": "extract", "schema": schema}])
    spec = settings.routes[0].schema_spec
    assert spec is not None
    return spec


def test_x1_the_mask_is_applied_on_the_logits_device() -> None:
    """On CUDA every constrained step raised (a CPU mask for device logits): every extract event was a
    model_error, and each such step ran its whole batch again one by one. The meta device shows the same."""
    class Everything:
        def fill(self, bitmask: torch.Tensor, row: int) -> None:
            bitmask[row] = -1

    rows = torch.zeros(2, 100, device="meta")
    allow_only(rows, [(0, Everything())])  # type: ignore[list-item]
    assert rows.device.type == "meta"


@pytest.mark.parametrize("pattern", ["^[[:alpha:]]+$", "^[a-z&&[^b]]$"])
def test_x2_a_pattern_the_grammar_and_the_check_read_differently_is_refused_at_load(pattern: str) -> None:
    """The grammar read a POSIX class or a set intersection, Python's `re` literal characters: it loaded, and
    every answer the grammar wrote failed the check."""
    with pytest.raises(ValueError, match="POSIX classes and set operations"):
        loads({"type": "object", "properties": {"name": {"type": "string", "pattern": pattern}}})


def test_x3_nested_counted_repetitions_that_outgrow_the_lexer_are_refused_at_load() -> None:
    """`(.{1,1000}){1,1000}` loaded, then broke the matcher at its first string token with SmolLM2's tokenizer."""
    with pytest.raises(ValueError, match="more than 100 times"):
        loads({"type": "object", "properties": {"s": {"type": "string", "pattern": "^(.{1,1000}){1,1000}x$"}}})
    assert loads({"type": "object", "properties": {"s": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{5}$"}}})


def test_x3_a_grammar_that_breaks_while_decoding_ends_its_request_with_the_reason(worker: LLMWorker) -> None:
    """Whatever still breaks a matcher mid-answer is named in the request's error, not left to look like a
    model that wrote no JSON."""
    spec = loads({"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]})
    grammars = Grammars(worker.tokenizer, worker.model.config.vocab_size, worker.eos_ids)

    class Breaking:
        def __init__(self) -> None:
            self.vocab_size = grammars.vocab_size

        def constraint(self, schema: str) -> Constraint:
            broken = grammars.constraint(schema)
            broken.accept(worker.tokenizer.convert_tokens_to_ids("z"))  # no object starts with z
            return broken

    engine = Engine(worker.model, EngineConfig(block_size=4, num_blocks=64), worker.eos_ids, Breaking())  # type: ignore[arg-type]
    prompt = tuple(worker.prompt_ids([({"role": "user", "content": "x"},)])[0])
    assert engine.add(0, TokenRequest(prompt, 20, 0.0, worker.eos_ids, schema=spec.text), 0.0) is None
    done = []
    while not engine.idle:
        done += engine.step()
    assert done[0].error is not None and "the schema's grammar broke" in done[0].error


def test_x4_integers_are_decoded_with_at_most_18_digits_so_every_answer_serializes(worker: LLMWorker) -> None:
    """A 30-digit integer matched `"type": "integer"`, then was dead-lettered `unserializable`."""
    spec = loads({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    matcher = Grammars(worker.tokenizer, worker.model.config.vocab_size, worker.eos_ids).matcher(spec.text)
    big = worker.tokenizer.encode('{"n":1234567890123456789', add_special_tokens=False)
    assert matcher.validate_tokens(big) == len(big) - 1  # the 19th digit is refused
    with pytest.raises(InvalidOutput, match="more than 18 digits"):  # a remote server's is caught on arrival
        loads(AMOUNTS).parse('{"order_id":123456789012345678901234567890,"amount":1,"urgency":"low"}')


@pytest.mark.parametrize("amount", ["1e400", "-1e999", "NaN", "Infinity"])
def test_x5_a_number_no_double_holds_is_an_invalid_output_not_a_null_under_the_schemas_name(amount: str) -> None:
    """1e400 matched `"type": "number"` as infinity, and the answer was written with `"amount": null`."""
    handler = Handler(task="extract", schema=AMOUNTS, output="answers")
    handler.accept(0, ts_ms=5_000)
    call = handler.pool.pending.pop(0)
    call.future.set_result(Generated(GenResult(f'{{"order_id":1,"amount":{amount},"urgency":"low"}}', 10, 10),
                                     0.0, 0.0, 1))
    handler.settle()
    (outcome,) = handler.writer.added
    assert isinstance(outcome.record, DeadLetter) and outcome.record.error is ErrorCode.INVALID_OUTPUT


def test_x5_every_answer_written_matches_the_schema_it_names() -> None:
    handler = Handler(task="extract", schema=AMOUNTS, output="answers")
    handler.accept(0, ts_ms=5_000)
    call = handler.pool.pending.pop(0)
    call.future.set_result(Generated(GenResult('{"order_id":7,"amount":2.5,"urgency":"high"}', 10, 10), 0.0, 0.0, 1))
    handler.settle()
    (outcome,) = handler.writer.added
    assert isinstance(outcome.record, Answer)
    assert orjson.loads(outcome.payload)["output"] == {"order_id": 7, "amount": 2.5, "urgency": "high"}


def test_x6_only_the_routes_own_task_feeds_count_field_counts() -> None:
    """A classify event on a counting extract route (it offers classify: it has labels) was counted as an
    urgency in a window where nothing was extracted."""
    handler = Handler(task="extract", schema=AMOUNTS, output="answers", labels=["low", "high"], count_field="urgency",
                      window=window())
    handler.accept(0, ts_ms=5_000, task="classify", text="anything")
    handler.pool.finish(0, ok=True)
    handler.settle()
    handler.accept(1, ts_ms=9_000, text="x")  # the watermark passes [5000, 6000): the window closes
    stage = handler.stages["r"]

    class NoFinals:
        async def windows_final(self, ids: list[str]) -> list[bool]:
            return [False] * len(ids)

    stage._state = NoFinals()  # type: ignore[assignment]

    async def close() -> None:
        stage.tick(NOW_MS)
        await stage.drain()

    handler.loop.run_until_complete(close())
    results = [o.record for o in handler.writer.added if not isinstance(o.record, Answer | DeadLetter)]
    assert results and all(not getattr(r, "labels", None) for r in results)


def test_x6_a_count_field_of_booleans_counts_json_text() -> None:
    route = Route(name="r", input="i", output="o", task="extract", count_field="ok",
                  window={"size_ms": 1, "output": "w"},  # type: ignore[arg-type]
                  schema={"type": "object", "properties": {"ok": {"enum": [True, False]}}, "required": ["ok"]})
    tally = TASKS["extract"].tally(route)
    assert tally is not None and tally({"ok": True}) == "true"


def test_x7_adding_the_schema_field_keeps_the_digests_of_answers_kept_before_it() -> None:
    """GenRequest gained `schema`; hashed as None, every kept answer of every generating route missed after the
    deploy, and the uncommitted tail after the restart was asked of the model again."""
    event = InputEvent(id="e1", text="what is kafka?")
    messages = ({"role": "system", "content": "s"}, {"role": "user", "content": event.text})
    kept_before = hashlib.sha256(orjson.dumps(
        ["m", "qa", "answer", "GenRequest",
         {"messages": list(messages), "max_new_tokens": 64, "temperature": 0.0, "ignore_eos": False, "session": None},
         None, None], option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert digest("m", "qa", "answer", GenRequest(messages, 64), event) == kept_before
    assert digest("m", "qa", "extract", GenRequest(messages, 64, schema=json.dumps(AMOUNTS)), event) != kept_before

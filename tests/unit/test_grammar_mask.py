"""Constrained decoding on a tiny random Llama with a character tokenizer: whatever a random model would say,
every constrained answer matches its schema, in batches that mix schemas and unconstrained rows, greedy and
sampled, in the continuous engine and in static `generate` batches alike."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.engine.engine import Engine, EngineConfig, Finished, TokenRequest
from streamer.engine.grammar import Grammars
from streamer.engine.requests import GenRequest
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model
from streamer.tasks.schemas import ExtractSchema, InvalidOutput
from tests.tiny import save_tiny_llama

JSON_CHARS = "{}[]"
TICKET = ExtractSchema.load({
    "type": "object",
    "properties": {"urgency": {"enum": ["low", "high"]}, "ok": {"type": "boolean"}},
    "required": ["urgency", "ok"], "additionalProperties": False,
})
TAGS = ExtractSchema.load({
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                   "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "name": {"type": ["string", "null"], "maxLength": 5}},
    "required": ["tags", "n", "name"], "additionalProperties": False,
})


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> LLMWorker:
    directory = save_tiny_llama(tmp_path_factory.mktemp("tiny-json"), extra_chars=JSON_CHARS)
    return LLMWorker(load_model(directory, device="cpu", dtype="float32"))


def engine_of(worker: LLMWorker) -> Engine:
    grammars = Grammars(worker.tokenizer, worker.model.config.vocab_size, worker.eos_ids)
    return Engine(worker.model, EngineConfig(block_size=4, num_blocks=512, max_running=8), worker.eos_ids, grammars)


def run(engine: Engine, requests: list[TokenRequest]) -> list[Finished]:
    for i, request in enumerate(requests):
        assert engine.add(i, request, 0.0) is None
    done: dict[int, Finished] = {}
    while not engine.idle:
        done.update((f.key, f) for f in engine.step())  # type: ignore[misc]
    return [done[i] for i in range(len(requests))]


def request(worker: LLMWorker, text: str, schema: ExtractSchema | None, temperature: float = 0.0,
            max_new: int = 120) -> TokenRequest:
    prompt = tuple(worker.prompt_ids([({"role": "user", "content": text},)])[0])
    return TokenRequest(prompt, max_new, temperature, worker.eos_ids, schema=schema.text if schema else None)


def answer(worker: LLMWorker, done: Finished, schema: ExtractSchema) -> dict[str, object]:
    assert done.error is None
    return schema.parse(worker.gen_result(done.tokens, 0, GenRequest(({"role": "user", "content": ""},), 200)).text)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 3.0], ids=["greedy", "sampled", "hot"])
def test_every_constrained_answer_matches_its_own_schema_in_a_mixed_batch(worker: LLMWorker,
                                                                          temperature: float) -> None:
    torch.manual_seed(1)
    schemas = [TICKET, TAGS, None, TAGS, TICKET, None]
    requests = [request(worker, f"message {i}", s, temperature) for i, s in enumerate(schemas)]
    done = run(engine_of(worker), requests)
    for finished, schema in zip(done, schemas, strict=True):
        if schema is not None:
            assert isinstance(answer(worker, finished, schema), dict)


def test_a_constraint_leaves_the_unconstrained_rows_of_its_steps_alone(worker: LLMWorker) -> None:
    free = request(worker, "hello there", None, max_new=30)
    alone = run(engine_of(worker), [free])[0].tokens
    together = run(engine_of(worker), [request(worker, "x", TICKET), free, request(worker, "y", TAGS)])[1].tokens
    assert together == alone
    with pytest.raises(InvalidOutput):  # what the random model says unconstrained is no ticket
        answer(worker, run(engine_of(worker), [free])[0], TICKET)


def test_every_token_sampled_was_one_the_grammar_allowed_at_its_step(worker: LLMWorker) -> None:
    """Replayed through a fresh matcher, every sampled token is accepted in turn (a forbidden one would not be)."""
    engine = engine_of(worker)
    torch.manual_seed(2)
    for finished in run(engine, [request(worker, f"m{i}", TAGS, 2.0) for i in range(6)]):
        assert engine.grammars is not None
        matcher = engine.grammars.matcher(TAGS.text)
        assert matcher.validate_tokens(finished.tokens) == len(finished.tokens)
        assert finished.tokens[-1] in worker.eos_ids  # the object closed, then the grammar allowed only the end


def test_a_token_cap_that_cuts_the_object_gives_an_invalid_output_not_broken_json(worker: LLMWorker) -> None:
    done = run(engine_of(worker), [request(worker, "cut short", TAGS, max_new=4)])[0]
    with pytest.raises(InvalidOutput, match="not JSON"):
        answer(worker, done, TAGS)


def test_static_generate_batches_honour_each_rows_schema_too(worker: LLMWorker) -> None:
    schemas = [TICKET, None, TAGS, TAGS]
    requests = [GenRequest(({"role": "user", "content": "m" * (i + 1)},), 120, schema=s.text if s else None)
                for i, s in enumerate(schemas)]
    for result, schema in zip(worker.generate(requests), schemas, strict=True):
        if schema is not None:
            assert isinstance(schema.parse(result.text), dict)


def test_a_temperature_too_small_to_divide_by_decodes_greedily_in_both_engines(worker: LLMWorker) -> None:
    """Found by the property test below: logits / 1e-45 overflow to inf, and the event was a model_error."""
    tiny, greedy = (request(worker, "hello", TICKET, t) for t in (1e-45, 0.0))
    done = run(engine_of(worker), [tiny, greedy])
    assert done[0].error is None and done[0].tokens == done[1].tokens
    free = [GenRequest(({"role": "user", "content": "hello"},), 12, temperature=t) for t in (1e-45, 0.0)]
    static = worker.generate(free)
    assert static[0].error is None and static[0].text == static[1].text


def test_an_engine_without_grammars_fails_a_constrained_request_alone(worker: LLMWorker) -> None:
    engine = Engine(worker.model, EngineConfig(block_size=4, num_blocks=64), worker.eos_ids)
    failed = engine.add(0, request(worker, "x", TICKET), 0.0)
    assert failed is not None and failed.error is not None and "schema" in failed.error


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.floats(0.0, 4.0), picks=st.lists(st.sampled_from(["t", "g", "-"]),
                                                                                   min_size=1, max_size=6))
def test_any_seed_temperature_and_mix_of_schemas_gives_valid_objects(worker: LLMWorker, seed: int,
                                                                     temperature: float, picks: list[str]) -> None:
    torch.manual_seed(seed)
    schemas = [{"t": TICKET, "g": TAGS, "-": None}[p] for p in picks]
    done = run(engine_of(worker), [request(worker, str(seed), s, temperature) for s in schemas])
    for finished, schema in zip(done, schemas, strict=True):
        if schema is not None:
            assert json.loads(json.dumps(answer(worker, finished, schema)))


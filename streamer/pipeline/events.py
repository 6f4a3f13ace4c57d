"""Turns one consumed message into its work: a dead letter, a model request, window items, outcomes.

The parts of an event in the OffsetTracker, each with its releaser:
- one for the event itself, released by its answer or dead letter (the writer, once written), or at
  once after window placement for a window-only route (`task: none`);
- one per window it joins (`WindowStage.add` holds them; the window's result releases them);
- one for its late record, when every window it belongs to has closed (released by that record).
The event's offset is committable when no part is left.

Answers reused (`streamer.pipeline.reuse`) change none of this: the event is placed in its windows as
it is consumed, whatever its look-up finds, and its own part is released by its answer's outcome, whether
that answer came from Redis or from the model. Only the model call is skipped on a hit; a classify
answer's label then comes from the kept answer.

A `stream: true` route's answer also streams out (`pipeline/partials.py`). Asked of the model (a look-up
miss, or reuse off), the model hands its pieces to the event's `Progress` beside the future, and the
event's final marker follows its outcome. Answered from Redis (a hit), a new run of the event's progress
holds the kept answer's whole text in one final delta, so a reader sees the answer it would have seen
typed. Progress holds no part either way: an answer's outcome, its Redis state and the commit rules are
the same whether or not its pieces were written.

A `chat` event is a turn of the conversation its key names (`streamer.pipeline.chat`): placed in its
windows as it is consumed like any event, then queued behind its conversation's turn in progress, its
own part held until it is answered or dead-lettered. The model call and the outcomes are this handler's
(`submit`, `replay`, `dead`), only the order and the history are the conversations'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections import Counter

from streamer.clock import Clock, SystemClock
from streamer.config import Route, Settings
from streamer.contracts import Answer, DeadLetter, ErrorCode, InputEvent
from streamer.engine.backend import Backend
from streamer.engine.requests import Generated, GenRequest, GenResult, Request
from streamer.kafka.offsets import TP, OffsetTracker, Ref
from streamer.observe.metrics import Metrics
from streamer.outcomes import Sealer
from streamer.pipeline.chat import ChatStore, Conversations, PendingTurn
from streamer.pipeline.parse import RawMessage, dead_letter, decode
from streamer.pipeline.partials import PartialWriter, Progress
from streamer.pipeline.reuse import Lookup, Reuse, digest
from streamer.pipeline.window_stage import WindowStage
from streamer.pipeline.writer import Outputs
from streamer.state.redis import Stored
from streamer.tasks.event import TASKS, Output, Tally, output_text, route_tasks, task_of
from streamer.tasks.schemas import InvalidOutput
from streamer.windows.content import LabelSlot, WindowItem

log = logging.getLogger(__name__)


class EventHandler:
    def __init__(self, settings: Settings, pool: Backend, writer: Outputs, tracker: OffsetTracker,
                 stages: dict[str, WindowStage], metrics: Metrics, sealer: Sealer, clock: Clock | None = None,
                 reuse: Reuse | None = None, partials: PartialWriter | None = None,
                 conversations: ChatStore | None = None) -> None:
        """`reuse`: look up kept answers before asking the model (None: always ask it). `partials` writes the
        progress of `stream: true` routes' answers (None: no route streams). `conversations`: where chat
        routes keep their histories (None: no route chats)."""
        self._settings, self._pool, self._writer, self._tracker = settings, pool, writer, tracker
        self._reuse, self._partials = reuse, partials
        self._metrics = metrics
        self._arrived: Counter[str] = Counter()  # events per route since the last flush, for the metric
        self._sealer = sealer
        self._clock = clock or SystemClock()
        self._routes = {route.input: route for route in settings.routes}
        self._tasks = {route.input: route_tasks(route) for route in settings.routes}
        self._stages = stages
        self._chat = (Conversations(conversations, pool, self, writer, tracker, settings.limits.max_new_tokens)
                      if conversations is not None else None)

    def accept(self, raw: RawMessage, now_ms: int) -> None:
        ref = self._tracker.track((raw.topic, raw.partition), raw.offset)
        if raw.timestamp_ms is None:  # a record without a timestamp: processing time stands in
            raw = dataclasses.replace(raw, timestamp_ms=now_ms)
        route = self._routes[raw.topic]
        self._arrived[route.name] += 1
        decoded = decode(raw, default_task=route.task, known_tasks=self._tasks[raw.topic],
                         limits=self._settings.limits)
        if isinstance(decoded, DeadLetter):
            self._dead(raw, decoded, route, ref)
            return
        if (ahead := self._ahead(decoded, raw, now_ms)) is not None:
            self._dead(raw, dead_letter(raw, ErrorCode.FUTURE, ahead, decoded.id), route, ref)
            return
        task = task_of(decoded, route)
        if task.converses and decoded.key is None:
            detail = "a chat event needs a key, its conversation's id: the event's `key` or the Kafka message key"
            self._dead(raw, dead_letter(raw, ErrorCode.NO_KEY, detail, decoded.id), route, ref)
            return
        slot = self._windows(decoded, route, raw, ref, now_ms)
        arrived_s = self._clock.monotonic_s()
        if task.converses:
            assert self._chat is not None, "a chat route's pipeline keeps conversations"
            self._chat.accept(PendingTurn(decoded, route, raw, ref, arrived_s))
            return
        if task.request is None:  # window-only: nothing to answer
            self._tracker.done(ref)
            return
        request = task.request(decoded, route, self._settings.limits.max_new_tokens)
        ask = functools.partial(self._ask_model, decoded, route, raw, ref, slot, arrived_s, request)
        if self._reuse is None:
            ask(None)
            return
        kept = digest(self._pool.model_name, route.name, task.name, request, decoded)
        if kept is None:  # an event that cannot be hashed: its answer is not kept either
            ask(None)
            return
        self._reuse.ask(Lookup(
            route.name, decoded.id, kept, miss=functools.partial(ask, kept),
            hit=functools.partial(self._reused, decoded, route, raw, ref, slot, arrived_s, kept)))

    @property
    def looking_up(self) -> int:
        """Events waiting for their look-up, or chat turns for their conversation's turn: each will take a slot
        of the model's queue."""
        return ((self._reuse.pending if self._reuse is not None else 0)
                + (self._chat.pending if self._chat is not None else 0))

    @property
    def failure(self) -> BaseException | None:
        reuse = self._reuse.failure if self._reuse is not None else None
        return reuse or (self._chat.failure if self._chat is not None else None)

    def forget(self, tps: list[TP]) -> None:
        """Partitions went away: their chat turns waiting for their conversation are dropped (replayed)."""
        if self._chat is not None:
            self._chat.forget(tps)

    def flush(self) -> None:
        """Look up the kept answers of the events accepted since the last flush, together; count them in the
        metrics (once per route and poll: a counter's increment per event was 5% of consuming)."""
        if self._reuse is not None:
            self._reuse.flush()
        for route, n in self._arrived.items():
            self._metrics.events_in(route, n)
        self._arrived.clear()

    async def drain(self) -> None:
        """Every event accepted so far answered from Redis or handed to the model; chat turns still waiting
        for their conversation are left to the replay, the turns out finish."""
        if self._reuse is not None:
            await self._reuse.drain()
        if self._chat is not None:
            await self._chat.drain()

    # --- what a chat turn needs (`streamer.pipeline.chat.TurnHost`) -----------------------------------------
    def submit(self, turn: PendingTurn, request: GenRequest, out: Outputs) -> asyncio.Future[Generated]:
        return self._submit(turn.event, turn.route, turn.raw, turn.ref, None, turn.arrived_s, request, None, out)

    def replay(self, turn: PendingTurn, answer: bytes) -> bool:
        return self._reused(turn.event, turn.route, turn.raw, turn.ref, None, turn.arrived_s, None, Stored("", answer))

    def dead(self, turn: PendingTurn, code: ErrorCode, detail: str) -> None:
        self._dead(turn.raw, dead_letter(turn.raw, code, detail, turn.event.id), turn.route, turn.ref)

    # --- answers ----------------------------------------------------------------------------------------------
    def _ask_model(self, event: InputEvent, route: Route, raw: RawMessage, ref: Ref, slot: LabelSlot | None,
                   arrived_s: float, request: Request, kept: str | None) -> None:
        self._submit(event, route, raw, ref, slot, arrived_s, request, kept, self._writer)

    def _submit(self, event: InputEvent, route: Route, raw: RawMessage, ref: Ref, slot: LabelSlot | None,
                arrived_s: float, request: Request, kept: str | None, out: Outputs) -> asyncio.Future[Generated]:
        """Submit the event to the model, its one outcome to `out`; a streaming route's run of progress opens
        here, as the model's pieces are what it streams (a hit opens its own in `_reused`)."""
        progress = self._progress(event, route, raw)
        future = self._pool.submit(request, _deadline_ms(event, route), progress.piece if progress else None)
        future.add_done_callback(functools.partial(self._answered, event, route, raw, ref, slot, arrived_s, kept,
                                                   progress, out))
        return future

    def _progress(self, event: InputEvent, route: Route, raw: RawMessage) -> Progress | None:
        """A new run of the event's progress where its route streams and its task generates text, else None."""
        if route.stream and self._partials is not None and task_of(event, route).generates:
            return self._partials.open(event.id, route.name, event.key, _key(event, raw))
        return None

    def _reused(self, event: InputEvent, route: Route, raw: RawMessage, ref: Ref, slot: LabelSlot | None,
                arrived_s: float, kept: str | None, stored: Stored) -> bool:
        """Answer the event with the kept answer; False when it is not an answer (the model answers then).

        A replay of the record it answered gets its very bytes. Another record of the event (a producer's
        second send) gets the same answer naming its own `source`, as every record's outcome does. On a
        streaming route the kept answer's whole text is a new run's one and final delta: a reader of the
        event's progress sees the answer it would have seen typed, and a final marker after every answer."""
        try:
            answer = Answer.model_validate_json(stored.answer)
        except ValueError:
            log.warning("the kept answer of event %s on route %s is not an answer; asking the model",
                        event.id, route.name)
            return False
        _resolve(slot, task_of(event, route).tally(route), answer.output)
        self._metrics.answer_reused(route.name, self._clock.monotonic_s() - arrived_s)
        topic, key = route.output or "", _key(event, raw)
        if answer.source == raw.source:
            outcome = self._sealer.reused(topic, key, answer, stored.answer, (ref,), route.name, kept)
        else:
            answer = answer.model_copy(update={"source": raw.source})
            outcome = self._sealer.seal(topic, key, answer, (ref,), route.name, digest=kept)
        self._writer.add(outcome)
        if (progress := self._progress(event, route, raw)) is not None:
            progress.piece(output_text(answer.output))
            progress.finish()
        return True

    def _ahead(self, event: InputEvent, raw: RawMessage, now_ms: int) -> str | None:
        """Why the event's time is too far in the future to be believed, or None.

        Its `ts` is judged against its record's timestamp, which the replay of the record carries too, so
        a replay judges it alike (against processing time, a record judged `future` could be accepted on a
        later replay and move the watermark past events already counted). The record's own timestamp is
        judged against processing time: a broker keeps it within `message.timestamp.after.max.ms` of its
        clock (1 h by default since Kafka 4.0), so only a broker that allows more lets that judgment
        depend on when it is made."""
        skew_ms = self._settings.limits.max_event_skew_ms
        event_ms, record_ms = _event_ms(event, raw), _record_ms(raw)
        if record_ms - now_ms > skew_ms:
            return (f"the record's timestamp {record_ms} is {record_ms - now_ms} ms ahead of processing time; "
                    f"the limit is {skew_ms} (max_event_skew_ms)")
        if event_ms - record_ms > skew_ms:
            return (f"event time {event_ms} is {event_ms - record_ms} ms ahead of its record's timestamp; "
                    f"the limit is {skew_ms} (max_event_skew_ms)")
        return None

    def _windows(self, event: InputEvent, route: Route, raw: RawMessage, ref: Ref, now_ms: int) -> LabelSlot | None:
        """Place the event in its route's windows; a late event gets a record on the late topic, a part of
        its own (whatever the task: the event's own part may be released before that record is written)."""
        stage = self._stages.get(route.name)
        if stage is None:
            return None
        own = TASKS[route.task]  # only the route's own task feeds its windows' counts: one vocabulary per route
        slot = LabelSlot() if task_of(event, route) is own and own.tally(route) is not None else None
        tokens = self._pool.count_tokens(event.text) if stage.window_task.counts_tokens else 0
        item = WindowItem(event.text, _event_ms(event, raw), event.key, tokens, slot)
        if stage.add(item, ref, now_ms):
            return slot
        self._tracker.hold(ref)
        detail = f"event time {item.ts_ms} is behind the watermark of route {route.name}"
        self._dead(raw, dead_letter(raw, ErrorCode.LATE, detail, event.id), route, ref,
                   topic=stage.window.late_topic)
        return None

    def _answered(self, event: InputEvent, route: Route, raw: RawMessage, ref: Ref, slot: LabelSlot | None,
                  arrived_s: float, kept: str | None, progress: Progress | None, out: Outputs,
                  future: asyncio.Future[Generated]) -> None:
        """A done-callback: whatever goes wrong, the event ends in exactly one outcome and its label
        slot resolves (a window waits for it), or the commit point would stay at it for ever. A streaming
        event's final marker names the dead letter's code where there is no answer."""
        generated: Generated | None = None
        error: str | None
        try:
            generated = future.result()
            error = generated.result.error
        except asyncio.CancelledError:
            error = "the model request was cancelled"
        except Exception as exc:  # the pool already split and retried; what is left is this event's
            error = repr(exc)
        failed: ErrorCode | None = None
        try:
            if generated is None or error is not None:
                raise _ModelFailed(error or "")
            answer = self._answer(event, route, raw, generated, arrived_s)
            _resolve(slot, task_of(event, route).tally(route), answer.output)
            self._write_answer(event, route, raw, ref, answer, generated, kept, out)
        except Exception as exc:  # the model's failure, a rejected output, or a bug building the answer
            _resolve(slot, None, None)
            if not isinstance(exc, _ModelFailed | InvalidOutput):
                log.exception("answering event %s failed", event.id)
            code = generated.result.error_code if generated is not None else None
            failed = (ErrorCode.INVALID_OUTPUT if isinstance(exc, InvalidOutput)
                      else ErrorCode(code or ErrorCode.MODEL_ERROR))
            self._dead(raw, dead_letter(raw, failed, str(exc) or repr(exc), event.id), route, ref, out=out)
        if progress is not None:
            progress.finish(failed.value if failed is not None else None)

    def _write_answer(self, event: InputEvent, route: Route, raw: RawMessage, ref: Ref, answer: Answer,
                      generated: Generated, kept: str | None, out: Outputs) -> None:
        self._metrics.answered(route.name, answer.latency_ms / 1000, answer.tokens_out)
        if generated.first_token_ms is not None:
            self._metrics.first_token(route.name, generated.first_token_ms / 1000)
        deadline_ms = _deadline_ms(event, route)
        if deadline_ms is not None and answer.latency_ms > deadline_ms:
            self._metrics.slo_miss(route.name)  # still answered: a late answer beats none
        out.add(self._sealer.seal(route.output or "", _key(event, raw), answer, (ref,), route.name, digest=kept))

    def _answer(self, event: InputEvent, route: Route, raw: RawMessage, generated: Generated,
                arrived_s: float) -> Answer:
        result = generated.result
        task = task_of(event, route)
        tokens_out = result.tokens_out if isinstance(result, GenResult) else 0  # a scored label generates none
        return Answer(
            id=event.id, key=event.key, task=task.name, output=task.answer(result, route),
            schema_id=route.schema_spec.id if task.structured and route.schema_spec is not None else None,
            model=self._pool.model_name,
            tokens_in=result.tokens_in, tokens_out=tokens_out, queued_ms=round(generated.queued_ms, 3),
            latency_ms=round((self._clock.monotonic_s() - arrived_s) * 1000, 3), source=raw.source,
            ts_in=_event_ms(event, raw), ts_out=self._clock.now_ms(), meta=event.meta,
        )

    def _dead(self, raw: RawMessage, letter: DeadLetter, route: Route, ref: Ref, topic: str | None = None,
              out: Outputs | None = None) -> None:
        target = topic or self._settings.kafka.dead_letter_topic
        self._metrics.dead_lettered(route.name, letter.error.value)
        if letter.error is ErrorCode.LATE:
            self._metrics.late(route.name)
        (out or self._writer).add(self._sealer.seal(target, raw.key, letter, (ref,), route.name))


def _resolve(slot: LabelSlot | None, tally: Tally | None, output: Output | None) -> None:
    """Count what the window counts of the answer (nothing where there is no answer), once."""
    if slot is not None and not slot.resolved:
        slot.resolve(tally(output) if tally is not None and output is not None else None)


class _ModelFailed(Exception):
    """The model answered this event with an error (after the pool's own retries)."""


def _deadline_ms(event: InputEvent, route: Route) -> float | None:
    """The route's SLO, or the event's own deadline where the route trusts its producers with admission
    order (`event_deadlines`): otherwise any producer could jump the queue with `deadline_ms: 1`."""
    if route.event_deadlines and event.params.deadline_ms is not None:
        return event.params.deadline_ms
    return route.slo_ms


def _record_ms(raw: RawMessage) -> int:
    assert raw.timestamp_ms is not None  # accept filled it in
    return raw.timestamp_ms


def _event_ms(event: InputEvent, raw: RawMessage) -> int:
    """Event time: the event's own `ts`, which decoding defaulted to the record's timestamp."""
    return event.ts if event.ts is not None else _record_ms(raw)


def _key(event: InputEvent, raw: RawMessage) -> bytes | None:
    return event.key.encode() if event.key is not None else raw.key

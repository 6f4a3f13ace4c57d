"""The piece buffer: an event's pieces coalesce into deltas numbered 0, 1, 2, ..., the last and only the last
final; without drops they join to the pieces; the text waiting never passes its bound; a finished event is
forgotten once its final delta is taken."""

from hypothesis import given
from hypothesis import strategies as st

from streamer.pipeline.pieces import PieceBuffer

# An operation on event 0..3: a piece of text, its end (with or without an error), or a flush.
ops = st.lists(st.one_of(
    st.tuples(st.just("piece"), st.integers(0, 3), st.text(max_size=12)),
    st.tuples(st.just("finish"), st.integers(0, 3), st.sampled_from([None, "model_error"])),
    st.tuples(st.just("take"), st.just(0), st.none()),
), max_size=80)


@given(ops, st.integers(1, 60))
def test_deltas_number_each_event_and_end_it_once(script, max_chars) -> None:
    buffer = PieceBuffer(max_chars)
    handles = [buffer.open(f"e{i}", "r", None, None)[0] for i in range(4)]
    sent: dict[int, list[str]] = {i: [] for i in range(4)}
    dropped = {i: False for i in range(4)}
    finished: dict[int, str | None] = {}
    deltas = []
    for op, event, arg in [*script, *(("finish", i, None) for i in range(4)), ("take", 0, None)]:
        if op == "piece":
            assert isinstance(arg, str)
            if buffer.add(handles[event], arg) is None:
                sent[event].append(arg)
            elif event not in finished:
                dropped[event] = True
        elif op == "finish":
            buffer.finish(handles[event], arg)
            finished.setdefault(event, arg)
        else:
            deltas += buffer.take()
        assert 0 <= buffer.chars <= max_chars
    assert len(buffer) == 0 and buffer.chars == 0  # everything finished and taken: nothing held
    for i in range(4):
        mine = [d for d in deltas if d.id == f"e{i}"]
        seqs = [d.seq for d in mine]
        assert seqs == sorted(set(seqs))
        assert [d.final for d in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].error == finished[i]
        assert [d.first for d in mine] == [True] + [False] * (len(mine) - 1)
        assert "".join(d.delta for d in mine) == "".join(sent[i])  # what was taken in, in order
        if dropped[i]:
            assert seqs[-1] == len(mine)  # one gap, before the final marker: where the text is missing
        else:
            assert seqs == list(range(len(mine)))


def test_pieces_between_two_takes_coalesce_into_one_delta() -> None:
    buffer = PieceBuffer(100)
    handle, _ = buffer.open("e", "r", "k", b"k")
    for piece in ("The", " capital", " is"):
        buffer.add(handle, piece)
    [delta] = buffer.take()
    assert (delta.seq, delta.delta, delta.final, delta.key, delta.record_key) == (0, "The capital is", False, "k", b"k")
    buffer.add(handle, " Paris.")
    buffer.finish(handle)
    [last] = buffer.take()
    assert (last.seq, last.delta, last.final) == (1, " Paris.", True)
    assert buffer.take() == [] and len(buffer) == 0


def test_past_the_bound_the_rest_of_the_text_is_dropped_and_the_final_marker_shows_the_gap() -> None:
    buffer = PieceBuffer(5)
    handle, _ = buffer.open("e", "r", None, None)
    assert buffer.add(handle, "abcd") is None
    assert buffer.add(handle, "efgh") == "buffer"  # 8 > 5: dropped, counted by the caller
    assert buffer.add(handle, "i") == "buffer"  # it would fit, but would not join to "abcd"
    assert [(d.seq, d.delta) for d in buffer.take()] == [(0, "abcd")]
    buffer.finish(handle)
    assert [(d.seq, d.delta, d.final) for d in buffer.take()] == [(2, "", True)]  # seq 1: the missing text


def test_a_piece_after_the_end_is_refused() -> None:
    buffer = PieceBuffer(100)
    handle, _ = buffer.open("e", "r", None, None)
    buffer.finish(handle, "model_error")
    assert buffer.add(handle, "late") == "ended"  # not counted: nothing of the event is missing
    [marker] = buffer.take()
    assert (marker.seq, marker.delta, marker.final, marker.error) == (0, "", True, "model_error")


def test_opening_an_open_id_retires_the_older_run() -> None:
    """A replay in the same process while the earlier run still streams: one run per id, the newer; the
    older's pending text and final marker are never taken, and its later pieces are refused as superseded."""
    buffer = PieceBuffer(100, run_prefix="p-")
    old, _ = buffer.open("e", "r", None, None)
    buffer.add(old, "The answer")
    new, retired = buffer.open("e", "r", None, None)
    assert retired == 2  # its pending delta and its final marker
    assert buffer.chars == 0
    assert buffer.add(old, " is") == "superseded"
    buffer.add(new, "The")
    buffer.finish(old)
    buffer.finish(new)
    deltas = buffer.take()
    assert [(d.seq, d.delta, d.final, d.run) for d in deltas] == [(0, "The", True, f"p-{new}")]
    assert len(buffer) == 0


def test_two_routes_streaming_one_id_keep_a_run_each() -> None:
    """Found by review (fails on the code before the fix): one event sent to two streaming routes (an answer
    and a translate route, say) has one id on both. Runs were one per id, so the second route's run retired
    the first's: its text stopped mid-answer and its final marker was never written (counted `superseded`),
    with no replay and no fault at all. Runs are one per (route, id), as kept answers are."""
    buffer = PieceBuffer(100, run_prefix="p-")
    answer, _ = buffer.open("e", "answer", None, None)
    buffer.add(answer, "The")
    translation, retired = buffer.open("e", "translate", None, None)
    assert retired == 0
    assert buffer.add(answer, " answer") is None
    buffer.add(translation, "La réponse")
    buffer.finish(answer)
    buffer.finish(translation)
    assert sorted((d.route, d.seq, d.delta, d.final) for d in buffer.take()) == [
        ("answer", 0, "The answer", True), ("translate", 0, "La réponse", True)]
    assert len(buffer) == 0

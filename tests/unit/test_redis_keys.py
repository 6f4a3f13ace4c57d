"""Redis key names: one module builds them all, user keys are encoded without ambiguity, and README's
"Redis data model" table documents exactly the names the module builds."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from streamer.state.keys import Keys, encode_key

README = Path(__file__).resolve().parents[2] / "README.md"


def test_ordinary_keys_are_kept_verbatim() -> None:
    for key in ("alice", "user:42", "a*b", "é", "x\\y", " "):
        assert encode_key(key) == key


def test_no_key_and_the_keys_that_could_be_mistaken_for_it_are_distinct() -> None:
    assert encode_key(None) == "*"
    assert encode_key("") == "\\"
    assert encode_key("*") == "\\*"
    assert encode_key("\\") == "\\\\"
    assert encode_key("\\*") == "\\\\*"


def test_the_encoding_is_one_to_one() -> None:
    keys = [None, "", "*", "**", "\\", "\\\\", "\\*", "*\\", "a", "\\a", "a\\", "None"]
    assert len({encode_key(k) for k in keys}) == len(keys)


def test_user_keys_go_through_the_encoding_in_every_name() -> None:
    keys = Keys("p")
    assert keys.per_key("") == "p:key:\\"
    assert keys.windows("r", None) == "p:windows:r:*"
    assert keys.windows("r", "*") == "p:windows:r:\\*"
    assert keys.windows("r", "alice") == "p:windows:r:alice"


def test_two_routes_streaming_one_id_have_a_partial_stream_each() -> None:
    """Found by review (fails on the code before the fix): `partial:{id}` was one stream for every route, so
    two routes streaming one event (one id) deleted each other's runs there, flush after flush."""
    keys = Keys("p")
    assert keys.partial("answer", "e") != keys.partial("translate", "e")
    assert keys.partial("a:b", "c") != keys.partial("a", "b:c")


ROUTES = st.one_of(st.sampled_from(["latest", "\\latest", "latest:x", "orders", "a", "a:b", "\\", ":"]),
                   st.text(max_size=8))
KEYS = st.one_of(st.none(), st.sampled_from(["orders", "", "*", "b:c", "latest"]), st.text(max_size=8))


@given(ROUTES, KEYS, ROUTES, KEYS)
@example("latest", "orders", "orders", None)
@example("a:b", "c", "a", "b:c")
def test_no_window_index_shares_its_name_with_another_or_with_a_routes_latest_results(r1, k1, r2, k2) -> None:
    """Found by review (fails on the code before the fix): route `latest`'s index of key `orders` was
    `windows:latest:orders`, route `orders`' latest-results hash: a sorted set where a hash is written, so
    every write of that window failed (WRONGTYPE) and a replay met it again."""
    keys = Keys("p")
    assert keys.windows(r1, k1) != keys.latest(r2)
    if (r1, k1) != (r2, k2):
        assert keys.windows(r1, k1) != keys.windows(r2, k2)


def documented_names() -> set[str]:
    """The first column of README's "Redis data model" table."""
    section = README.read_text().split("## Redis data model", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE))


def built_names(prefix: str = "streamer") -> set[str]:
    """Every name `Keys` builds, its arguments shown as `{name}` placeholders as in the README."""
    keys = Keys(prefix)
    names = set()
    for attr, member in inspect.getmembers(Keys):
        if attr.startswith("_") or attr == "prefix":
            continue
        if isinstance(member, property):
            names.add(getattr(keys, attr))
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            names.add(getattr(keys, attr)(*(f"{{{p}}}" for p in params)))
    return names


def test_the_readme_table_documents_exactly_the_names_built() -> None:
    assert documented_names() == built_names()

"""Every Redis key name streamer writes or reads, built in this one place.

README's "Redis data model" is the contract a user's own dashboard reads; a unit test checks that its
table lists exactly the names built here, so the two cannot drift apart.

Event keys are user data, so they reach key names and hash fields through `encode_key`: ordinary keys
stay verbatim (what a reader expects), `None` (no key, or a window across all keys) is `*`, and a key
that is empty, is `*`, or starts with a backslash gets a backslash in front. No two keys share a name.
"""

from __future__ import annotations

from dataclasses import dataclass

NO_KEY = "*"
_ESCAPE = "\\"


def encode_key(key: str | None) -> str:
    """The key as it appears in Redis names and fields; one-to-one, and the identity for ordinary keys."""
    if key is None:
        return NO_KEY
    if key in ("", NO_KEY) or key.startswith(_ESCAPE):
        return _ESCAPE + key
    return key


def _segment(name: str) -> str:
    """A name inside a key, with the separator and the escape escaped: one-to-one, and verbatim when plain."""
    return name.replace(_ESCAPE, _ESCAPE * 2).replace(":", _ESCAPE + ":")


_LATEST = "latest"


def _index_route(route: str) -> str:
    """A route inside a window index's name: escaped as `_segment`, and a route named `latest` written `\\latest`,
    since `windows:latest:{route}` holds each route's latest results. One-to-one, and verbatim when plain."""
    segment = _segment(route)
    return _ESCAPE + segment if segment == _LATEST else segment


@dataclass(frozen=True)
class Keys:
    """The names under one prefix (`redis.prefix`)."""

    prefix: str

    @property
    def counters(self) -> str:
        return f"{self.prefix}:counters"

    @property
    def late(self) -> str:
        return f"{self.prefix}:late"

    @property
    def answers(self) -> str:
        return f"{self.prefix}:answers"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead-letters"

    @property
    def partials(self) -> str:
        """Every streaming answer's deltas, capped: one stream a dashboard reads for all answers typing."""
        return f"{self.prefix}:partials"

    @property
    def fence(self) -> str:
        return f"{self.prefix}:fence"

    @property
    def channel(self) -> str:
        """The pub/sub channel of window results (a channel, not a key, but in the same namespace)."""
        return f"{self.prefix}:windows"

    def answer(self, id: str) -> str:
        return f"{self.prefix}:answer:{id}"

    def reuse(self, route: str, id: str) -> str:
        """An answer kept for reuse, with the digest of what it answered: per route, as two routes may
        see one id (`answer(id)` is the last written of them). The route's colons are escaped, so no
        (route, id) pair can name another's."""
        return f"{self.prefix}:reuse:{_segment(route)}:{id}"

    def chat(self, route: str, key: str) -> str:
        """A conversation of a `task: chat` route: its history document and revision (`streamer.tasks.chat`).
        The route's colons are escaped and the key encoded, so no (route, key) pair names another's."""
        return f"{self.prefix}:chat:{_segment(route)}:{encode_key(key)}"

    def partial(self, route: str, id: str) -> str:
        """One event's deltas as a route's answer to it is generated (a stream, expiring): per route, as two
        routes may stream one id. The route's colons are escaped, so no (route, id) pair names another's."""
        return f"{self.prefix}:partial:{_segment(route)}:{id}"

    def per_key(self, key: str) -> str:
        return f"{self.prefix}:key:{encode_key(key)}"

    def event_guard(self, topic: str, partition: int, offset: int) -> str:
        """Claimed by the first write of an event's own outcome, its answer or its dead letter: by where the
        event is, as ids are the producer's choice, and one for both, as a replay may answer an event a
        model error dead-lettered before."""
        return f"{self.prefix}:seen:e:{topic}:{partition}:{offset}"

    def late_guard(self, topic: str, partition: int, offset: int) -> str:
        """Claimed by the first write of an event's late record (an outcome beside its answer)."""
        return f"{self.prefix}:seen:l:{topic}:{partition}:{offset}"

    def result_guard(self, id: str) -> str:
        """Claimed by the first write of the dead letter that stands for a window result the broker
        refused (it has no event of its own): by the result's id, which a replay rebuilds alike."""
        return f"{self.prefix}:seen:r:{id}"

    def window(self, id: str) -> str:
        return f"{self.prefix}:window:{id}"

    def windows(self, route: str, key: str | None) -> str:
        """A (route, key)'s window ids. The route is escaped (`_index_route`), so no pair names another's and
        no index is a route's `latest` hash."""
        return f"{self.prefix}:windows:{_index_route(route)}:{encode_key(key)}"

    def latest(self, route: str) -> str:
        return f"{self.prefix}:windows:{_LATEST}:{route}"

    def latest_order(self, route: str) -> str:
        """When each key of `latest(route)` was last updated, so the least recent can be dropped."""
        return f"{self.prefix}:latest-order:{route}"

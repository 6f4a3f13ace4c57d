"""A start-up check that Redis answers and accepts our login, with an error that says which failed."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from streamer.errors import StreamerError


def check_redis(url: str, timeout_s: float = 5.0) -> None:
    """PING once, without retries: a refused password fails the start now, not after backoff."""
    parts = urlsplit(url)
    where = f"Redis at {parts.hostname}:{parts.port or 6379}"
    user = unquote(parts.username or "default")
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                  retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    except AuthenticationError as exc:
        raise StreamerError(f"{where} refused the login of user {user!r} (see redis.username and redis.password): "
                            f"{exc}") from None
    except ResponseError as exc:  # e.g. the ACL user may not run PING
        raise StreamerError(f"{where} refused user {user!r}: {exc}") from None
    except (RedisConnectionError, RedisTimeoutError) as exc:
        tls = " (TLS)" if parts.scheme == "rediss" else ""
        raise StreamerError(f"cannot reach {where}{tls}: {exc}") from None
    finally:
        client.close()

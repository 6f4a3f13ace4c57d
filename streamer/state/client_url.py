"""The one Redis URL every client of a process uses, with `redis.username/password/tls` folded in.

Every Redis client (state writer, dashboard, probes) is built from a URL, so credentials and TLS
options travel inside it: redis-py reads the userinfo and `ssl_*` query parameters of a URL. The
result holds the password: show it only through `streamer.observe.logs.redact`.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from streamer.config import RedisSettings


def client_url(settings: RedisSettings, url: str) -> str:
    """`url` with the configured user, password and TLS options (which override the URL's own)."""
    parts = urlsplit(url)
    scheme = "rediss" if settings.tls is not None else parts.scheme
    username = settings.username if settings.username is not None else parts.username
    password = settings.password.get_secret_value() if settings.password is not None else parts.password
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    if username or password:
        userinfo = quote(username or "", safe="") + (f":{quote(password, safe='')}" if password else "")
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path, _query(settings, parts.query), parts.fragment))


def _query(settings: RedisSettings, query: str) -> str:
    tls = settings.tls
    if tls is None:
        return query
    options = {"ssl_cert_reqs": "required", "ssl_check_hostname": str(tls.verify_hostname).lower()}
    files = {"ssl_ca_certs": tls.ca_file, "ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    options |= {key: str(path) for key, path in files.items() if path is not None}
    if tls.key_password is not None:
        options["ssl_password"] = tls.key_password.get_secret_value()
    return "&".join(part for part in (query, urlencode(options)) if part)

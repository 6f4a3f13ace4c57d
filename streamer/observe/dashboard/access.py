"""Who may read the dashboard: anyone when no token is set, else whoever shows `observe.auth_token`.

Scripts and `curl` send `Authorization: Bearer <token>`. A browser opens the page once as `/?token=<token>`
and is redirected to `/` with a session cookie: EventSource cannot send headers, and a cookie needs no
change to the page. The cookie is HttpOnly (the page's scripts never see it), SameSite=Strict (no other
site can make the browser use it), ends with the browser session, and holds a value derived from the
token rather than the token itself. The token leaves the address bar at once, so it is not kept in the
history nor sent in later URLs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from pydantic import SecretStr

from streamer.observe.http import bearer, same_secret

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "streamer-dashboard"
# JSON, so the page shows it when its own requests are refused (e.g. after the token changed).
_REFUSAL = orjson.dumps({"error": "this dashboard needs its token: open it once as /?token=<token>, "
                                  "or send Authorization: Bearer <token>"}).decode()


class Access:
    def __init__(self, token: SecretStr | None) -> None:
        self._token = token.get_secret_value() if token is not None else ""

    def guard(self, handler: Handler, *, page: bool = False) -> Handler:
        """`handler` for callers with the token; `page`: also where a browser trades `?token=` for the cookie."""
        token = self._token
        if not token:
            return handler
        cookie = hmac.new(token.encode(), b"streamer dashboard session", hashlib.sha256).hexdigest()

        async def guarded(request: web.Request) -> web.StreamResponse:
            if page and "token" in request.query:
                if not same_secret(request.query["token"], token):
                    raise _unauthorized()
                # Relative, as the page's own URLs are: right behind a proxy that serves it under a path too.
                signed_in = web.HTTPSeeOther(location="./")
                signed_in.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", secure=request.secure, path="/")
                raise signed_in
            if not (same_secret(bearer(request), token) or same_secret(request.cookies.get(COOKIE), cookie)):
                raise _unauthorized()
            return await handler(request)

        return guarded


def _unauthorized() -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(text=_REFUSAL, content_type="application/json",
                                headers={"WWW-Authenticate": 'Bearer realm="streamer dashboard"'})

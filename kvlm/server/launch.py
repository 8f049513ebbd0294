"""Run the app under uvicorn on a socket bound beforehand (so port 0 works and the real
address is known before serving), in the foreground or on a background thread."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; raises OSError (e.g. the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(app: FastAPI, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class ServerThread:
    """Uvicorn on a daemon thread (for tests and embedding): `start()` returns once it serves."""

    def __init__(self, app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
        self.server = make_server(app, log_level)
        self.sock = sock
        self.url = socket_url(sock)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="kvlm-uvicorn", daemon=True
        )

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

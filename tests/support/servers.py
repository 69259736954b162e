"""Accept-loop servers for tests: a listening socket served from a thread, each connection handed to a handler."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

JOIN_TIMEOUT_S = 5.0


class AcceptLoop:
    """Accepts on `sock` until close(); each connection goes to `handle(conn)`, in a thread of its own when
    `threaded` (keep-alive servers), else inline (one short answer per connection). The handler owns `conn`.

        loop = AcceptLoop(socket.create_server(("127.0.0.1", 0)), self._one)
        loop.port ... loop.close()
    """

    def __init__(self, sock: socket.socket, handle: Callable[[socket.socket], None], *, threaded: bool = True) -> None:
        self.sock, self.handle, self.threaded = sock, handle, threaded
        self.sock.settimeout(0.2)  # so close() is quick even where closing does not wake accept()
        self.accepted = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True, name=f"accept-loop-{self.port}")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            conn.settimeout(None)
            self.accepted += 1
            if self.threaded:
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
            else:
                self.handle(conn)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        if threading.current_thread() is not self.thread:
            self.thread.join(JOIN_TIMEOUT_S)

    def __enter__(self) -> AcceptLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

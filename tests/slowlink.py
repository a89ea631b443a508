"""A slow network path for tests: a TCP proxy that delivers everything the server sends ``delay`` seconds
late (in order), like a congested uplink or an overloaded broker."""

from __future__ import annotations

import queue
import socket
import threading
import time


class SlowLink:
    def __init__(self, upstream_port: int, delay: float, host: str = "127.0.0.1"):
        self.upstream, self.delay, self.host = (host, upstream_port), delay, host
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []

    def start(self) -> "SlowLink":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.delay), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        q: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def send() -> None:
            while True:
                due, data = q.get()
                if not data:
                    break
                time.sleep(max(0.0, due - time.monotonic()))  # the link's latency, not test synchronisation
                try:
                    dst.sendall(data)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic() + delay, data))
            if not data:
                break

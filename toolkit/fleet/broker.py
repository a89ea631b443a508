"""The embedded MQTT broker (amqtt, pure Python) for zero-set-up demos and small fleets.

Production fleets use a real broker (Mosquitto, EMQX, HiveMQ) via ``--broker mqtt[s]://host:port``.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from toolkit.errors import ToolkitError


class EmbeddedBroker:
    """amqtt running on its own event loop in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgeship-broker", daemon=True)
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15) -> "EmbeddedBroker":
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise ToolkitError("the embedded broker needs amqtt: pip install 'edgeship[host]'") from exc
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                            "max_connections": 10000}},
                  "sys_interval": 0, "auth": {"allow-anonymous": True}, "topic-check": {"enabled": False}}
        self._thread.start()

        async def boot() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        try:
            asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout)  # listening when done
        except Exception as exc:
            raise ToolkitError(f"embedded broker could not listen on {self.host}:{self.port} ({exc})") from exc
        return self

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
            except Exception:  # shutting down anyway
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

"""A small pool of interpreter instances of one model, so concurrent requests run in parallel.

Runtimes release the GIL while they compute, but one interpreter runs one call at a time. The pool
lends each of up to ``size`` instances of the same model file to one caller at a time. It starts with
one instance and loads another only when every instance is busy, so an idle agent holds one
interpreter and its RSS does not grow with the pool size.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from agent.runtime import Model


class InterpreterPool:
    def __init__(self, first: Model, size: int):
        self.size = max(1, size)
        self._template = first
        self._idle: list[Model] = [first]
        self._count = 1
        self._cond = threading.Condition()

    @property
    def instances(self) -> int:
        """How many interpreters exist (busy or idle)."""
        return self._count

    @contextmanager
    def lease(self) -> Iterator[Model]:
        """Borrow an interpreter for one call; waits while all ``size`` instances are busy."""
        model = self._take()
        try:
            yield model
        finally:
            with self._cond:
                self._idle.append(model)
                self._cond.notify()

    def _take(self) -> Model:
        with self._cond:
            while not self._idle and self._count >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1  # reserve the slot; load outside the lock
        try:
            return self._template.clone()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

"""Typed, bounded reads of one JSON message's fields, for the protocol's parsers: every error names the
topic and the field, and says what was expected."""

from __future__ import annotations

import math
from typing import Any

from agent.errors import ProtocolError

MAX_TEXT = 1000  # free texts (errors) are cut here

_MISSING = object()


class Fields:
    """Typed, bounded reads of one message's fields; errors name the topic and the field. A field that is
    absent or null takes the default; without a default it is an error. (Runs for every record the
    collector stores: each read is one dict lookup and one type check.)"""

    def __init__(self, doc: Any, where: str):
        if not isinstance(doc, dict):
            raise ProtocolError(f"{where}: expected an object")
        self.doc, self.where = doc, where

    def _default(self, key: str, default: Any) -> Any:
        if default is _MISSING:
            raise ProtocolError(f"{self.where}: {key} is missing")
        return default

    def _bad(self, key: str, what: str) -> ProtocolError:
        return ProtocolError(f"{self.where}: {key} must be {what}, got {self.doc.get(key)!r:.60}")

    def str(self, key: str, default: Any = _MISSING, max_len: int = 200) -> Any:
        x = self.doc.get(key)
        if x is None:
            return self._default(key, default)
        if type(x) is not str or len(x) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        return x

    def text(self, key: str) -> str:
        """Free text (errors): any string, cut at MAX_TEXT."""
        x = self.doc.get(key)
        if x is None:
            return ""
        if type(x) is not str:
            raise self._bad(key, "a string")
        return x[:MAX_TEXT]

    def int(self, key: str, lo: int = 0, hi: int = 2**62, default: Any = _MISSING) -> Any:
        x = self.doc.get(key)
        if x is None:
            return self._default(key, default)
        if type(x) is not int or not lo <= x <= hi:  # (type, not isinstance: true is not a number here)
            raise self._bad(key, f"an integer in [{lo}, {hi}]")
        return x

    def num(self, key: str, default: Any = _MISSING, lo: float = -1e18, hi: float = 1e18) -> Any:
        x = self.doc.get(key)
        if x is None:
            return self._default(key, default)
        if (type(x) is float or type(x) is int) and lo <= x <= hi:  # NaN and ±inf fail the comparison
            return float(x)
        raise self._bad(key, f"a number in [{lo:g}, {hi:g}]")

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        x = self.doc.get(key)
        if x is None:
            x = self._default(key, default)
        if type(x) is not bool:
            raise self._bad(key, "true or false")
        return x

    def sha(self, key: str, default: Any = _MISSING) -> Any:
        x = self.doc.get(key)
        if x is None:
            return self._default(key, default)
        if not is_sha(x):
            raise self._bad(key, "a SHA-256 hex digest")
        return x

    def sub(self, key: str) -> "Fields | None":
        x = self.doc.get(key)
        return None if x is None else Fields(x, f"{self.where}: {key}")

    def items(self, key: str, max_len: int) -> list["Fields"]:
        x = self.doc.get(key)
        if x is None:
            return []
        if type(x) is not list or len(x) > max_len:
            raise self._bad(key, f"a list of at most {max_len} objects")
        return [Fields(v, f"{self.where}: {key}[{i}]") for i, v in enumerate(x)]

    def ints(self, key: str, max_len: int, default: Any = _MISSING) -> Any:
        x = self.doc.get(key)
        if x is None:
            return self._default(key, default)
        if type(x) is not list or len(x) > max_len or (x and (set(map(type, x)) != {int} or min(x) < 0
                                                             or max(x) >= 2**53)):
            raise self._bad(key, f"a list of at most {max_len} non-negative integers")
        return x

    def nums(self, key: str, max_len: int, default: Any = _MISSING) -> Any:
        x = self.doc.get(key)
        if x is None:
            return self._default(key, default)
        if type(x) is not list or len(x) > max_len or not set(map(type, x)) <= {int, float}:
            raise self._bad(key, f"a list of at most {max_len} numbers")
        try:
            out = [float(c) for c in x]  # an int beyond float: OverflowError
        except OverflowError:
            out = [math.inf]
        if not math.isfinite(sum(out)):  # one sum instead of a check per value: NaN and inf propagate
            raise self._bad(key, "a list of finite numbers")
        return out

    def raw(self, key: str, default: Any) -> Any:
        """The value as sent (the caller checks it)."""
        x = self.doc.get(key)
        return default if x is None else x


def is_sha(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)

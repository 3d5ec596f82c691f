"""A test host, so a plugin's handler runs in plain Python.

Outside a component the SDK sends its host calls here: publishes are
recorded, settings and request answers come from what the test set::

    import sluice_sdk as sluice
    from sluice_sdk import testing
    import app

    testing.reset()
    testing.set_config("to", "audit")
    app.handle(testing.message("orders.created", b'{"id": "1"}'))
    assert testing.published()[0].subject == "audit"

Nothing here runs inside a component.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional, Tuple


class Ok:
    """A WIT `result` success inside a list, as componentize-py makes it."""

    def __init__(self, value):
        self.value = value


class Err(Exception):
    """A WIT `result` error, as componentize-py raises it."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


class _types:  # the generated `types` module's shapes
    @dataclass
    class Header:
        name: str
        value: str

    @dataclass
    class Message:
        id: str
        route: str
        subject: str
        key: Optional[str]
        headers: list
        payload: bytes
        attempt: int
        timestamp_ms: int
        reply_to: Optional[str]

    @dataclass
    class Reply:
        headers: list
        payload: bytes

    @dataclass
    class HandlerError_Retryable:
        value: str

    @dataclass
    class HandlerError_Permanent:
        value: str

    @dataclass
    class HostError_Denied:
        value: str

    @dataclass
    class HostError_Timeout:
        pass

    @dataclass
    class HostError_Failed:
        value: str

    class Level(Enum):
        TRACE = 0
        DEBUG = 1
        INFO = 2
        WARN = 3
        ERROR = 4


class _World:
    pass


@dataclass
class Published:
    subject: str
    headers: List[Tuple[str, str]]
    payload: bytes
    # In a batch: the index of the message it belongs to.
    item: Optional[int] = None


@dataclass
class _State:
    published: List[Published] = field(default_factory=list)
    logs: List[Tuple[str, str]] = field(default_factory=list)
    settings: Dict[str, str] = field(default_factory=dict)
    answers: Dict[str, bytes] = field(default_factory=dict)


_state = _State()


class _host:  # the generated `host` module's functions
    @staticmethod
    def log(level, text: str) -> None:
        _state.logs.append((level.name.lower(), text))

    @staticmethod
    def publish(subject: str, headers, payload: bytes) -> None:
        from . import _in_batch_handler

        if _in_batch_handler:
            # As the host does: an effect of no message is refused in a batch.
            raise Err(_types.HostError_Failed("a plain publish inside a batch handler: use publish_for(msg, ...)"))
        _state.published.append(Published(subject, [(h.name, h.value) for h in headers], bytes(payload)))

    @staticmethod
    def publish_item(item: int, subject: str, headers, payload: bytes) -> None:
        _state.published.append(Published(subject, [(h.name, h.value) for h in headers], bytes(payload), item))

    @staticmethod
    def request(subject: str, payload: bytes, timeout_ms: int) -> bytes:
        if subject in _state.answers:
            return _state.answers[subject]
        raise Err(_types.HostError_Timeout())

    @staticmethod
    def config(key: str) -> Optional[str]:
        return _state.settings.get(key)


def reset() -> None:
    """Forgets publishes, logs, settings and answers."""
    global _state
    _state = _State()


def published() -> List[Published]:
    """What the handler published since the last reset, in order."""
    return list(_state.published)


def logs() -> List[Tuple[str, str]]:
    return list(_state.logs)


def set_config(key: str, value: str) -> None:
    _state.settings[key] = value


def answer(subject: str, payload: bytes) -> None:
    """`request(subject, ...)` answers this (others time out)."""
    _state.answers[subject] = bytes(payload)


def message(
    subject: str,
    payload: bytes | str,
    headers: List[Tuple[str, str]] = (),
    attempt: int = 1,
    key: Optional[str] = None,
    reply_to: Optional[str] = None,
):
    """A raw message as the host hands it to the component's `handle`."""
    body = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    return _types.Message(
        id="test-1",
        route="test",
        subject=subject,
        key=key,
        headers=[_types.Header(n, v) for n, v in headers],
        payload=body,
        attempt=attempt,
        timestamp_ms=0,
        reply_to=reply_to,
    )


def handle(raw) -> Tuple[str, object]:
    """Runs the registered handler as the host would: ("ok", reply) or
    ("retryable" | "permanent", reason)."""
    from . import WitWorld

    before = len(_state.published)
    try:
        return ("ok", WitWorld().handle(raw))
    except Err as e:
        # As the host does: a failed handler's publishes are never sent.
        del _state.published[before:]
        kind = "permanent" if isinstance(e.value, _types.HandlerError_Permanent) else "retryable"
        return (kind, e.value.value)


def _kind(e: Err) -> Tuple[str, object]:
    kind = "permanent" if isinstance(e.value, _types.HandlerError_Permanent) else "retryable"
    return (kind, e.value.value)


def handle_batch(raws) -> List[Tuple[str, object]]:
    """Runs a batch as the host would on a route with `batch`: one
    ("ok", reply) or ("retryable" | "permanent", reason) per message; the
    publishes of the messages that failed are dropped."""
    from . import WitWorld

    before = len(_state.published)
    results = WitWorld().handle_batch(list(raws))
    if len(results) != len(raws):
        raise AssertionError(f"{len(results)} outcomes for {len(raws)} messages")
    failed = {i for i, r in enumerate(results) if isinstance(r, Err)}
    _state.published[before:] = [p for p in _state.published[before:] if p.item not in failed]
    return [_kind(r) if isinstance(r, Err) else ("ok", r.value) for r in results]

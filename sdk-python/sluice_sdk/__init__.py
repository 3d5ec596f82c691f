"""The sluice plugin SDK for Python.

A handler is one decorated function::

    import sluice_sdk as sluice
    from sluice_sdk import WitWorld  # the component's export; keep this line

    @sluice.handler
    def handle(msg: sluice.Message):
        order = msg.json()                     # malformed JSON -> Permanent
        sluice.publish_json("audit.orders", order)
        sluice.log.info(f"order {order['order_id']}")

Return ``None`` (done), a :class:`Reply` (sent to the request's reply
subject), or raise :class:`Retryable` / :class:`Permanent`. Any other
exception is retryable, as a panic is for a Rust plugin. Publishes are
buffered by the host and sent only when the handler returns.

On a route with ``batch``, the host hands the component a whole batch in
one call: the ``@handler`` function runs once per message, and what it
publishes belongs to that message (dropped if it fails). A function marked
``@batch_handler`` instead takes the list and returns one outcome per
message (``None``/a reply, or the exception it failed with), publishing with
:func:`publish_for`.

Build with ``cargo xtask plugins`` (or componentize-py directly with
``-w batch-handler``, see the README); the WIT in ``wit/`` is the contract. Outside a component (plain
``python -m unittest``) the host calls go to :mod:`sluice_sdk.testing`.
"""

from __future__ import annotations

import json as _json
import re as _re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

import sys as _sys

if _sys.platform == "wasi":
    # Inside a component: the bindings componentize-py generates from wit/.
    # (Never the test host there: its publishes would go nowhere.)
    from componentize_py_types import Err, Ok
    from wit_world import WitWorld as _World
    from wit_world.imports import host as _host
    from wit_world.imports import types as _types
else:
    # Plain Python (a plugin's own tests): the test host of `testing`.
    from .testing import Err, Ok, _host, _types, _World

__all__ = [
    "Message",
    "Reply",
    "Retryable",
    "Permanent",
    "handler",
    "batch_handler",
    "publish",
    "publish_for",
    "publish_json_for",
    "publish_json",
    "request",
    "config",
    "log",
    "WitWorld",
]

Headers = Iterable[Tuple[str, str]]


class Retryable(Exception):
    """Transient failure: retried with the route's backoff, then dead-lettered."""


class Permanent(Exception):
    """Poison message: dead-lettered at once, never retried."""


class Message:
    """One delivered message, read-only."""

    __slots__ = ("_raw", "_item")

    def __init__(self, raw: _types.Message, item: Optional[int] = None) -> None:
        self._raw = raw
        # Its index in the batch being handled (None: handled alone).
        self._item = item

    @property
    def id(self) -> str:
        """Broker-native id (stream sequence, topic/partition/offset, ...)."""
        return self._raw.id

    @property
    def route(self) -> str:
        return self._raw.route

    @property
    def subject(self) -> str:
        """NATS subject, Kafka topic or AMQP routing key."""
        return self._raw.subject

    @property
    def key(self) -> Optional[str]:
        return self._raw.key

    @property
    def attempt(self) -> int:
        """Delivery attempt, starting at 1."""
        return self._raw.attempt

    @property
    def timestamp_ms(self) -> int:
        return self._raw.timestamp_ms

    @property
    def reply_to(self) -> Optional[str]:
        return self._raw.reply_to

    @property
    def payload(self) -> bytes:
        return bytes(self._raw.payload)

    @property
    def headers(self) -> List[Tuple[str, str]]:
        """Headers in broker order; a name may appear more than once."""
        return [(h.name, h.value) for h in self._raw.headers]

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name`` (case-insensitive)."""
        wanted = name.lower()
        for h in self._raw.headers:
            if h.name.lower() == wanted:
                return h.value
        return None

    def text(self) -> str:
        """The payload as UTF-8; anything else is a permanent failure."""
        try:
            return bytes(self._raw.payload).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Permanent(f"payload is not UTF-8: {e}") from None

    def json(self, **loads_options: Any) -> Any:
        """The payload parsed as JSON; malformed JSON is a permanent failure
        (as for the Rust SDK, a lone surrogate escape such as "\\ud800" is
        malformed: it is no character). Keyword arguments go to
        ``json.loads`` (``object_pairs_hook``, ``parse_int``...)."""
        text = self.text()
        try:
            value = _json.loads(text, **{"parse_constant": _no_constant, **loads_options})
        except (ValueError, RecursionError) as e:
            raise Permanent(f"payload is not valid JSON: {e}") from None
        if "\\u" in text and _lone_surrogate(text):
            raise Permanent("payload is not valid JSON: a lone surrogate escape")
        return value


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON.
    raise ValueError(f"{name} is not JSON")


_ESCAPE = _re.compile(r"\\(u[0-9a-fA-F]{4}|.)", _re.S)


def _lone_surrogate(text: str) -> bool:
    """True if a \\uD800-\\uDFFF escape is not one half of a pair."""
    high_ends = None  # where a high surrogate escape ended, awaiting its low half
    for m in _ESCAPE.finditer(text):
        esc = m.group(1)
        cp = int(esc[1:], 16) if esc[0] == "u" else -1
        if high_ends is not None and (m.start() != high_ends or not 0xDC00 <= cp <= 0xDFFF):
            return True
        if high_ends is not None:
            high_ends = None
        elif 0xD800 <= cp <= 0xDBFF:
            high_ends = m.end()
        elif 0xDC00 <= cp <= 0xDFFF:
            return True
    return high_ends is not None


@dataclass
class Reply:
    """An answer to a request, sent to its reply subject."""

    payload: Union[bytes, str] = b""
    headers: List[Tuple[str, str]] = field(default_factory=list)

    @staticmethod
    def json(value: Any, headers: Headers = ()) -> "Reply":
        return Reply(_dumps(value), list(headers))


_handler: Optional[Callable[[Message], Any]] = None


_batch_handler: Optional[Callable[[List[Message]], List[Any]]] = None


def batch_handler(fn: Callable[[List[Message]], List[Any]]) -> Callable[[List[Message]], List[Any]]:
    """Marks the function that handles a whole batch (routes with
    ``batch``): it returns one outcome per message, in order: ``None``, a
    :class:`Reply`, bytes or str for a success, or the exception the message
    failed with (:class:`Retryable`, :class:`Permanent`, any other is
    retryable). An exception raised by the function fails every message."""
    global _batch_handler
    _batch_handler = fn
    return fn


def handler(fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
    """Marks the function that handles each message."""
    global _handler
    _handler = fn
    return fn


def _dumps(value: Any) -> bytes:
    # Compact, key order kept: the same bytes serde_json writes.
    try:
        # No NaN or Infinity: they are not JSON.
        text = _json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        # This value will never serialise: retrying cannot help.
        raise Permanent(f"cannot encode as JSON: {e}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        # A lone surrogate (JSON allows "\ud800", UTF-8 does not): the
        # message carrying it will never encode, so retrying cannot help.
        raise Permanent(f"cannot encode as UTF-8 JSON: {e}") from None


def _bytes(payload: Union[bytes, bytearray, str]) -> bytes:
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)


def _wit_headers(headers: Headers) -> List[_types.Header]:
    return [_types.Header(name=str(n), value=str(v)) for n, v in headers]


def _host_error(e: Err) -> Exception:
    err = e.value
    # A denied subject is a deployment mistake that retrying will not fix.
    if isinstance(err, _types.HostError_Denied):
        return Permanent(f"denied by the host: {err.value}")
    if isinstance(err, _types.HostError_Timeout):
        return Retryable("request timed out")
    return Retryable(getattr(err, "value", str(err)))


# In a batch, the index of the message whose ``@handler`` runs: what it
# publishes belongs to that message.
_item: Optional[int] = None


def _publish(item: Optional[int], subject: str, payload: Union[bytes, str], headers: Headers) -> None:
    try:
        if item is None:
            _host.publish(subject, _wit_headers(headers), _bytes(payload))
        else:
            _host.publish_item(item, subject, _wit_headers(headers), _bytes(payload))
    except Err as e:
        raise _host_error(e) from None


def publish(subject: str, payload: Union[bytes, str], headers: Headers = ()) -> None:
    """Queues a message for ``subject``; sent only if the handler returns
    (in a batch: if this message's handling succeeds)."""
    _publish(_item, subject, payload, headers)


def publish_for(msg: Message, subject: str, payload: Union[bytes, str], headers: Headers = ()) -> None:
    """In a ``@batch_handler``: queues a message on behalf of ``msg``, sent
    only if ``msg``'s outcome is a success."""
    _publish(msg._item, subject, payload, headers)


def publish_json(subject: str, value: Any, headers: Headers = ()) -> None:
    """Queues ``value`` as compact JSON for ``subject``."""
    publish(subject, _dumps(value), headers)


def publish_json_for(msg: Message, subject: str, value: Any, headers: Headers = ()) -> None:
    """In a ``@batch_handler``: ``value`` as compact JSON on behalf of ``msg``."""
    publish_for(msg, subject, _dumps(value), headers)


# While a ``@batch_handler`` runs, a plain ``publish`` belongs to no message:
# the host refuses it and runs the batch again one message at a time.
_in_batch_handler = False


def _run_batch(batch: List[Message]) -> List[Any]:
    global _in_batch_handler
    _in_batch_handler = True
    try:
        return list(_batch_handler(batch))
    finally:
        _in_batch_handler = False


def request(subject: str, payload: Union[bytes, str], timeout_ms: int = 1000) -> bytes:
    """Sends a request and waits for its answer (NATS request/reply)."""
    try:
        return bytes(_host.request(subject, _bytes(payload), max(0, min(int(timeout_ms), 2**32 - 1))))
    except Err as e:
        raise _host_error(e) from None


def config(key: str) -> Optional[str]:
    """This plugin's setting ``key`` from the config file, or None."""
    return _host.config(key)


class _Log:
    """``sluice.log.info("...")``: lines in the host's log, tagged with the message."""

    def trace(self, text: str) -> None:
        _host.log(_types.Level.TRACE, str(text))

    def debug(self, text: str) -> None:
        _host.log(_types.Level.DEBUG, str(text))

    def info(self, text: str) -> None:
        _host.log(_types.Level.INFO, str(text))

    def warn(self, text: str) -> None:
        _host.log(_types.Level.WARN, str(text))

    def error(self, text: str) -> None:
        _host.log(_types.Level.ERROR, str(text))


log = _Log()


def _reply(out: Any) -> Optional[_types.Reply]:
    if out is None:
        return None
    if isinstance(out, Reply):
        return _types.Reply(headers=_wit_headers(out.headers), payload=_bytes(out.payload))
    if isinstance(out, (bytes, bytearray, str)):
        return _types.Reply(headers=[], payload=_bytes(out))
    raise TypeError(f"a handler returns None, a Reply, bytes or str, not {type(out).__name__}")


def _failure(e: BaseException) -> Err:
    # Only a handler error passes as it is (a host error would not lower
    # as one).
    if isinstance(e, Err) and isinstance(e.value, (_types.HandlerError_Permanent, _types.HandlerError_Retryable)):
        return e
    if isinstance(e, Permanent):
        return Err(_types.HandlerError_Permanent(str(e) or "permanent failure"))
    if isinstance(e, Retryable):
        return Err(_types.HandlerError_Retryable(str(e) or "retryable failure"))
    # Anything else (sys.exit too): retryable, like a panic.
    return Err(_types.HandlerError_Retryable(f"{type(e).__name__}: {e}"))


def _handle_one(msg: Message) -> Optional[_types.Reply]:
    if _handler is None:
        raise Err(_types.HandlerError_Permanent("no function is marked with @sluice_sdk.handler"))
    try:
        out = _handler(msg)
    except BaseException as e:
        raise _failure(e) from None
    try:
        return _reply(out)
    except TypeError as e:
        # A value no reply can be made of: a bug a retry cannot fix (as for
        # a batch handler's item).
        raise _failure(Permanent(str(e))) from None


def _item_result(out: Any):
    if isinstance(out, BaseException):
        return _failure(out)
    try:
        return Ok(_reply(out))
    except TypeError as e:
        return _failure(Permanent(str(e)))


class WitWorld(_World):
    """The component's exports: call the functions marked with ``@handler``
    (and ``@batch_handler``)."""

    def handle(self, msg: _types.Message) -> Optional[_types.Reply]:
        if _handler is None and _batch_handler is not None:
            # A route without `batch`: a batch of one (a plain publish is
            # this message's).
            try:
                outcomes = list(_batch_handler([Message(msg)]))
            except BaseException as e:
                raise _failure(e) from None
            if len(outcomes) != 1:
                raise Err(_types.HandlerError_Permanent(f"the batch handler gave {len(outcomes)} outcomes for 1 message"))
            result = _item_result(outcomes[0])
            if isinstance(result, Err):
                raise result
            return result.value
        return _handle_one(Message(msg))

    def handle_batch(self, msgs: List[_types.Message]) -> list:
        global _item
        batch = [Message(m, i) for i, m in enumerate(msgs)]
        if _batch_handler is not None:
            try:
                outcomes = _run_batch(batch)
            except BaseException as e:
                failed = _failure(e)
                return [failed for _ in batch]
            # A list of another length fails every message (the host says so).
            return [_item_result(o) for o in outcomes]
        results = []
        for msg in batch:
            _item = msg._item
            try:
                results.append(Ok(_handle_one(msg)))
            except Err as e:
                results.append(e)
            finally:
                _item = None
        return results

"""The order-events example in Python: validates an order event and
publishes an enriched copy to ``enriched.orders.<event_type>``, exactly as
the Rust order-processor does."""

import sluice_sdk as sluice
from sluice_sdk import WitWorld  # noqa: F401  (the component's export)

I64 = range(-(2**63), 2**63)
FIELDS = ("order_id", "user_id", "amount_cents", "event_type")


class _Object(dict):
    """A JSON object that remembers the keys it held more than once."""

    repeated: frozenset = frozenset()


def _object(pairs):
    obj = _Object(pairs)
    seen = set()
    obj.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _integer(text: str):
    # JSON's -0 is a float to serde (so not an i64): the same here.
    return -0.0 if text == "-0" else int(text)


def _event(msg: sluice.Message) -> dict:
    """The order event, read the way serde reads the Rust example's struct:
    an object (a repeated field is an error, other keys are ignored) or an
    array of the four fields in order."""
    event = msg.json(object_pairs_hook=_object, parse_int=_integer)
    if isinstance(event, list):
        if len(event) != len(FIELDS):
            raise sluice.Permanent(f"an array of {len(event)} values, not the {len(FIELDS)} fields")
        return dict(zip(FIELDS, event))
    if isinstance(event, _Object):
        repeated = sorted(event.repeated & set(FIELDS))
        if repeated:
            raise sluice.Permanent(f"duplicate field `{repeated[0]}`")
    return event


def _field(event: dict, name: str, kind: type):
    value = event.get(name) if isinstance(event, dict) else None
    # bool is an int in Python, not in JSON.
    if type(value) is not kind or (kind is int and value not in I64):
        raise sluice.Permanent(f"field `{name}` is missing or not a {kind.__name__}")
    return value


@sluice.handler
def handle(msg: sluice.Message) -> None:
    # Malformed JSON or missing fields will never succeed: permanent.
    event = _event(msg)
    order_id = _field(event, "order_id", str)
    user_id = _field(event, "user_id", str)
    amount_cents = _field(event, "amount_cents", int)
    event_type = _field(event, "event_type", str)
    if not event_type or any(c in event_type for c in ".*> "):
        raise sluice.Permanent(f"event_type {event_type!r} is not a subject token")
    cents = abs(amount_cents)
    enriched = {
        "order_id": order_id,
        "user_id": user_id,
        "amount_cents": amount_cents,
        "amount": f"{'-' if amount_cents < 0 else ''}{cents // 100}.{cents % 100:02d}",
        "event_type": event_type,
        "source_subject": msg.subject,
        "source_id": msg.id,
        "attempt": msg.attempt,
    }
    subject = f"enriched.orders.{event_type}"
    sluice.publish_json(subject, enriched)
    sluice.log.debug(f"order {order_id} -> {subject}")

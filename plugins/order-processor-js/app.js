// The order-events example in JavaScript: validates an order event and
// publishes an enriched copy to `enriched.orders.<event_type>`, exactly as
// the Rust order-processor does.

import * as sluice from "sluice-sdk";
export { handle } from "sluice-sdk";

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

const FIELDS = ["order_id", "user_id", "amount_cents", "event_type"];

// The order event, read the way serde reads the Rust example's struct: an
// object, or an array of the four fields in order. (A repeated key cannot
// be seen through JSON.parse: the last one wins here, serde refuses it.)
function eventOf(msg) {
  const event = msg.json();
  if (!Array.isArray(event)) return event;
  if (event.length !== FIELDS.length) {
    throw new sluice.Permanent(`an array of ${event.length} values, not the ${FIELDS.length} fields`);
  }
  return Object.fromEntries(FIELDS.map((name, i) => [name, event[i]]));
}

function field(event, name, kind) {
  const value = event !== null && typeof event === "object" && !Array.isArray(event) ? event[name] : undefined;
  const ok =
    kind === "integer"
      ? // JSON's -0 is a float to serde (so not an i64): the same here.
        Number.isSafeInteger(value) && !Object.is(value, -0) && BigInt(value) >= I64_MIN && BigInt(value) <= I64_MAX
      : typeof value === kind;
  if (!ok) throw new sluice.Permanent(`field \`${name}\` is missing or not a ${kind}`);
  return value;
}

sluice.handler((msg) => {
  // Malformed JSON or missing fields will never succeed: permanent.
  const event = eventOf(msg);
  const orderId = field(event, "order_id", "string");
  const userId = field(event, "user_id", "string");
  const amountCents = field(event, "amount_cents", "integer");
  const eventType = field(event, "event_type", "string");
  if (eventType === "" || /[.*> ]/.test(eventType)) {
    throw new sluice.Permanent(`event_type ${JSON.stringify(eventType)} is not a subject token`);
  }
  const cents = Math.abs(amountCents);
  const enriched = {
    order_id: orderId,
    user_id: userId,
    amount_cents: amountCents,
    amount: `${amountCents < 0 ? "-" : ""}${Math.floor(cents / 100)}.${String(cents % 100).padStart(2, "0")}`,
    event_type: eventType,
    source_subject: msg.subject,
    source_id: msg.id,
    attempt: msg.attempt,
  };
  const subject = `enriched.orders.${eventType}`;
  sluice.publishJson(subject, enriched);
  sluice.log.debug(`order ${orderId} -> ${subject}`);
});

// The order-processor's own tests, in Node with the SDK's test host:
// node sdk-js/test.mjs plugins/order-processor-js (`cargo xtask test` runs them).

import test from "node:test";
import assert from "node:assert/strict";
import * as testing from "sluice-sdk/testing";
import "./app.js";

const order = (fields = {}) =>
  testing.message(
    "orders.created",
    JSON.stringify({ order_id: "o-1", user_id: "u-1", amount_cents: 1999, event_type: "created", ...fields }),
  );

test("an order is enriched and published by event type", () => {
  testing.reset();
  assert.deepEqual(testing.handle(order({ event_type: "shipped", amount_cents: -5 })), ["ok", undefined]);
  const [out] = testing.published();
  assert.equal(out.subject, "enriched.orders.shipped");
  const body = JSON.parse(new TextDecoder().decode(out.payload));
  assert.equal(body.amount, "-0.05");
  assert.equal(body.source_subject, "orders.created");
});

test("malformed JSON is permanent and publishes nothing", () => {
  testing.reset();
  assert.equal(testing.handle(testing.message("orders.created", "{"))[0], "permanent");
  assert.deepEqual(testing.published(), []);
});

test("an event type that is no subject token is permanent", () => {
  testing.reset();
  assert.equal(testing.handle(order({ event_type: "a.b" }))[0], "permanent");
});

test("a non-integer amount is permanent", () => {
  for (const amount of ["12", true, 1.5, null]) {
    testing.reset();
    assert.equal(testing.handle(order({ amount_cents: amount }))[0], "permanent", String(amount));
  }
});

test("in a batch each order has its own outcome and publishes", () => {
  testing.reset();
  const outcomes = testing.handleBatch([
    order({ order_id: "o-1" }),
    testing.message("orders.created", "{"),
    order({ order_id: "o-3" }),
  ]);
  assert.deepEqual(
    outcomes.map(([kind]) => kind),
    ["ok", "permanent", "ok"],
  );
  const published = testing.published();
  assert.deepEqual(
    published.map((p) => p.item),
    [0, 2],
    "each publish belongs to its order",
  );
  assert.deepEqual(
    published.map((p) => JSON.parse(new TextDecoder().decode(p.payload)).order_id),
    ["o-1", "o-3"],
  );
});

"""The order-processor's own tests, in plain Python (the SDK's test host):
python3 -m unittest discover -s plugins/order-processor-py (with sdk-python
on PYTHONPATH; `cargo xtask test` runs them)."""

import json
import unittest

import app  # noqa: F401  (registers the handler)
from sluice_sdk import testing


def order(**fields):
    event = {"order_id": "o-1", "user_id": "u-1", "amount_cents": 1999, "event_type": "created"}
    event.update(fields)
    return testing.message("orders.created", json.dumps(event))


class OrderProcessor(unittest.TestCase):
    def setUp(self):
        testing.reset()

    def test_an_order_is_enriched_and_published_by_event_type(self):
        self.assertEqual(testing.handle(order(event_type="shipped", amount_cents=-5)), ("ok", None))
        [out] = testing.published()
        self.assertEqual(out.subject, "enriched.orders.shipped")
        body = json.loads(out.payload)
        self.assertEqual(body["amount"], "-0.05")
        self.assertEqual(body["source_subject"], "orders.created")

    def test_in_a_batch_each_order_has_its_own_outcome_and_publishes(self):
        outcomes = testing.handle_batch([order(order_id="o-1"), testing.message("orders.created", b"{"), order(order_id="o-3")])
        self.assertEqual([kind for kind, _ in outcomes], ["ok", "permanent", "ok"])
        published = testing.published()
        self.assertEqual([p.item for p in published], [0, 2], "each publish belongs to its order")
        self.assertEqual([json.loads(p.payload)["order_id"] for p in published], ["o-1", "o-3"])

    def test_malformed_json_is_permanent_and_publishes_nothing(self):
        kind, _ = testing.handle(testing.message("orders.created", b"{"))
        self.assertEqual(kind, "permanent")
        self.assertEqual(testing.published(), [])

    def test_an_event_type_that_is_no_subject_token_is_permanent(self):
        self.assertEqual(testing.handle(order(event_type="a.b"))[0], "permanent")

    def test_a_non_integer_amount_is_permanent(self):
        for amount in ["12", True, 1.5, None]:
            self.assertEqual(testing.handle(order(amount_cents=amount))[0], "permanent", amount)


if __name__ == "__main__":
    unittest.main()

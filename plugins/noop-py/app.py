"""Does nothing: the Python handler of the benchmarks."""

import sluice_sdk as sluice
from sluice_sdk import WitWorld  # noqa: F401  (the component's export)


@sluice.handler
def handle(msg: sluice.Message) -> None:
    return None

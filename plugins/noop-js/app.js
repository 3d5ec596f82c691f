// Does nothing: the JavaScript handler of the benchmarks.

import * as sluice from "sluice-sdk";
export { handle } from "sluice-sdk";

sluice.handler(() => undefined);

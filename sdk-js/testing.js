// A test host, so a plugin's handler runs in Node.
//
// `node sdk-js/test.mjs PLUGIN_DIR` bundles each `*.test.js` of the plugin
// with the SDK's host calls pointed here: publishes are recorded, settings
// and request answers come from what the test set.
//
//   import * as testing from "sluice-sdk/testing";
//   import "./app.js";
//   testing.reset();
//   const [kind] = testing.handle(testing.message("orders.created", '{"id":"1"}'));
//
// Nothing here runs inside a component.

import * as sdk from "./index.js";

let state;

/** Forgets publishes, logs, settings and answers. */
export function reset() {
  state = { published: [], logs: [], settings: new Map(), answers: new Map() };
}
reset();

// --- the host interface, as the component's import provides it ---

export function log(level, text) {
  state.logs.push([level, text]);
}

export function publish(subject, headers, payload) {
  if (sdk.inBatch()) {
    // As the host does: an effect of no message is refused in a batch.
    const e = new Error("a plain publish inside a batch handler: use publishFor(msg, ...)");
    e.payload = { tag: "failed", val: e.message };
    throw e;
  }
  state.published.push({ subject, headers: headers.map((h) => [h.name, h.value]), payload, item: null });
}

export function publishItem(item, subject, headers, payload) {
  state.published.push({ subject, headers: headers.map((h) => [h.name, h.value]), payload, item });
}

export function request(subject, payload, timeoutMs) {
  if (state.answers.has(subject)) return state.answers.get(subject);
  const e = new Error("request timed out");
  e.payload = { tag: "timeout" };
  throw e;
}

export function config(key) {
  return state.settings.has(key) ? state.settings.get(key) : undefined;
}

// --- for tests ---

/** What the handler published since the last reset, in order. */
export function published() {
  return [...state.published];
}

export function logs() {
  return [...state.logs];
}

export function setConfig(key, value) {
  state.settings.set(key, String(value));
}

/** `request(subject, ...)` answers this (others time out). */
export function answer(subject, payload) {
  state.answers.set(subject, typeof payload === "string" ? new TextEncoder().encode(payload) : payload);
}

/** A raw message as the host hands it to the component's `handle`. */
export function message(subject, payload, { headers = [], attempt = 1, key, replyTo } = {}) {
  return {
    id: "test-1",
    route: "test",
    subject,
    key,
    headers: headers.map(([name, value]) => ({ name, value })),
    payload: typeof payload === "string" ? new TextEncoder().encode(payload) : payload,
    attempt,
    timestampMs: 0n,
    replyTo,
  };
}

/** Runs the registered handler as the host would: ["ok", reply] or
 *  ["retryable" | "permanent", reason]; a failure's publishes are dropped. */
export function handle(raw) {
  const before = state.published.length;
  try {
    return ["ok", sdk.handle(raw)];
  } catch (e) {
    if (e && e.payload && typeof e.payload.tag === "string") {
      state.published.length = before;
      return [e.payload.tag, e.payload.val];
    }
    throw e;
  }
}

/** Runs a batch as the host would on a route with `batch`: one ["ok",
 *  reply] or ["retryable" | "permanent", reason] per message; the
 *  publishes of the messages that failed are dropped. */
export function handleBatch(raws) {
  const before = state.published.length;
  const results = sdk.handleBatch(raws);
  if (results.length !== raws.length) {
    throw new Error(`${results.length} outcomes for ${raws.length} messages`);
  }
  const failedItems = new Set(results.flatMap((r, i) => (r.tag === "err" ? [i] : [])));
  const kept = state.published.slice(before).filter((p) => !failedItems.has(p.item));
  state.published.length = before;
  state.published.push(...kept);
  return results.map((r) => (r.tag === "ok" ? ["ok", r.val] : [r.val.tag, r.val.val]));
}

// The sluice plugin SDK for JavaScript.
//
// A handler is one registered function; the module re-exports `handle`,
// the component's export:
//
//   import * as sluice from "sluice-sdk";
//   export { handle } from "sluice-sdk";
//
//   sluice.handler((msg) => {
//     const order = msg.json();                 // malformed JSON -> Permanent
//     sluice.publishJson("audit.orders", order);
//     sluice.log.info(`order ${order.order_id}`);
//   });
//
// Return nothing (done), a Reply (sent to the request's reply subject), or
// throw Retryable / Permanent. Any other exception is retryable, as a panic
// is for a Rust plugin. Publishes are buffered by the host and sent only
// when the handler returns. The WIT in wit/ is the contract.
//
// On a route with `batch`, the host hands the component a whole batch in
// one call (`handleBatch`, exported by the build): the registered handler
// runs once per message, and what it publishes belongs to that message
// (dropped if it fails). A function registered with `sluice.batchHandler`
// instead takes the array and returns one outcome per message (nothing or
// a reply for a success, or the Error it failed with), publishing with
// `sluice.publishFor(msg, ...)`.

import * as host from "sluice:plugin/host@0.1.1";

const encoder = new TextEncoder();

/** Transient failure: retried with the route's backoff, then dead-lettered. */
export class Retryable extends Error {
  constructor(message) {
    super(message);
    this.name = "Retryable";
  }
}

/** Poison message: dead-lettered at once, never retried. */
export class Permanent extends Error {
  constructor(message) {
    super(message);
    this.name = "Permanent";
  }
}

/** One delivered message, read-only. */
export class Message {
  #raw;
  #item;
  /** `item`: its index in the batch being handled (null: handled alone). */
  constructor(raw, item = null) {
    this.#raw = raw;
    this.#item = item;
  }
  /** Its index in the batch being handled, or null. */
  get item() {
    return this.#item;
  }
  /** Broker-native id (stream sequence, topic/partition/offset, ...). */
  get id() {
    return this.#raw.id;
  }
  get route() {
    return this.#raw.route;
  }
  /** NATS subject, Kafka topic or AMQP routing key. */
  get subject() {
    return this.#raw.subject;
  }
  get key() {
    return this.#raw.key;
  }
  /** Delivery attempt, starting at 1. */
  get attempt() {
    return this.#raw.attempt;
  }
  get timestampMs() {
    return this.#raw.timestampMs;
  }
  get replyTo() {
    return this.#raw.replyTo;
  }
  /** The body, a Uint8Array. */
  get payload() {
    return bytes(this.#raw.payload);
  }
  /** Headers in broker order, as [name, value] pairs. */
  get headers() {
    return this.#raw.headers.map((h) => [h.name, h.value]);
  }
  /** The first header called `name` (case-insensitive), or undefined. */
  header(name) {
    const wanted = String(name).toLowerCase();
    const found = this.#raw.headers.find((h) => h.name.toLowerCase() === wanted);
    return found === undefined ? undefined : found.value;
  }
  /** The body as UTF-8; anything else is a permanent failure. */
  text() {
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(bytes(this.#raw.payload));
    } catch (e) {
      throw new Permanent(`payload is not UTF-8: ${e.message}`);
    }
  }
  /** The body parsed as JSON; malformed JSON is a permanent failure (as
   *  for the Rust SDK, a lone surrogate escape such as "\ud800" is
   *  malformed: it is no character). */
  json() {
    const text = this.text();
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new Permanent(`payload is not valid JSON: ${e.message}`);
    }
    if (text.includes("\\u") && loneSurrogate(text)) {
      throw new Permanent("payload is not valid JSON: a lone surrogate escape");
    }
    return value;
  }
}

/** True if a \uD800-\uDFFF escape is not one half of a pair. */
function loneSurrogate(text) {
  let highEnds = -1; // where a high surrogate escape ended, awaiting its low half
  for (const m of text.matchAll(/\\(u[0-9a-fA-F]{4}|[^])/g)) {
    const cp = m[1][0] === "u" && m[1].length === 5 ? parseInt(m[1].slice(1), 16) : -1;
    if (highEnds >= 0 && (m.index !== highEnds || cp < 0xdc00 || cp > 0xdfff)) return true;
    if (highEnds >= 0) highEnds = -1;
    else if (cp >= 0xd800 && cp <= 0xdbff) highEnds = m.index + m[0].length;
    else if (cp >= 0xdc00 && cp <= 0xdfff) return true;
  }
  return highEnds >= 0;
}

/** An answer to a request, sent to its reply subject. */
export class Reply {
  constructor(payload = new Uint8Array(), headers = []) {
    this.payload = payload;
    this.headers = headers;
  }
  static json(value, headers = []) {
    return new Reply(JSON.stringify(value), headers);
  }
}

let registered = null;
let registeredBatch = null;
// In a batch, the index of the message whose handler runs: what it
// publishes belongs to that message.
let current = null;

/** Registers the function that handles a whole batch (routes with
 *  `batch`): it returns one outcome per message, in order: nothing, a
 *  Reply, a string or bytes for a success, or the Error the message failed
 *  with (Retryable, Permanent, any other is retryable). An exception thrown
 *  by the function fails every message. */
export function batchHandler(fn) {
  if (typeof fn !== "function") {
    throw new TypeError("sluice.batchHandler takes a function");
  }
  registeredBatch = fn;
  return fn;
}

/** Registers the function that handles each message. */
export function handler(fn) {
  if (typeof fn !== "function") {
    throw new TypeError("sluice.handler takes a function");
  }
  registered = fn;
  return fn;
}

function isBytes(value) {
  return ArrayBuffer.isView(value) || value instanceof ArrayBuffer || Array.isArray(value);
}

function bytes(payload) {
  if (typeof payload === "string") return encoder.encode(payload);
  if (ArrayBuffer.isView(payload)) {
    return new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  }
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  // A message's own payload may come as a plain list of bytes.
  if (Array.isArray(payload)) return Uint8Array.from(payload);
  throw new TypeError("a payload is a string, a Uint8Array or an ArrayBuffer");
}

function witHeaders(headers) {
  return Array.from(headers, ([name, value]) => ({ name: String(name), value: String(value) }));
}

function hostError(e) {
  const err = e && e.payload;
  if (!err || typeof err.tag !== "string") return e;
  // A denied subject is a deployment mistake that retrying will not fix.
  if (err.tag === "denied") return new Permanent(`denied by the host: ${err.val}`);
  if (err.tag === "timeout") return new Retryable("request timed out");
  return new Retryable(String(err.val));
}

function publishAs(item, subject, payload, headers) {
  try {
    if (item === null) {
      host.publish(subject, witHeaders(headers), bytes(payload));
    } else {
      host.publishItem(item, subject, witHeaders(headers), bytes(payload));
    }
  } catch (e) {
    throw hostError(e);
  }
}

/** Queues a message for `subject`; sent only if the handler returns (in a
 *  batch: if this message's handling succeeds). */
export function publish(subject, payload, headers = []) {
  publishAs(current, subject, payload, headers);
}

/** In a batch handler: queues a message on behalf of `msg`, sent only if
 *  `msg`'s outcome is a success. */
export function publishFor(msg, subject, payload, headers = []) {
  publishAs(msg.item, subject, payload, headers);
}

function json(value) {
  try {
    return JSON.stringify(value);
  } catch (e) {
    // A BigInt or a cycle will never serialise: retrying cannot help.
    throw new Permanent(`cannot encode as JSON: ${e.message}`);
  }
}

/** Queues `value` as compact JSON for `subject`. */
export function publishJson(subject, value, headers = []) {
  publish(subject, json(value), headers);
}

/** In a batch handler: `value` as compact JSON on behalf of `msg`. */
export function publishJsonFor(msg, subject, value, headers = []) {
  publishFor(msg, subject, json(value), headers);
}

/** Sends a request and waits for its answer (NATS request/reply). */
export function request(subject, payload, timeoutMs = 1000) {
  const ms = Math.max(0, Math.min(Math.floor(Number(timeoutMs)) || 0, 0xffffffff));
  try {
    return host.request(subject, bytes(payload), ms);
  } catch (e) {
    throw hostError(e);
  }
}

/** This plugin's setting `key` from the config file, or undefined. */
export function config(key) {
  const value = host.config(key);
  return value === null ? undefined : value;
}

/** Lines in the host's log, tagged with the route, plugin and message id. */
export const log = {
  trace: (text) => host.log("trace", String(text)),
  debug: (text) => host.log("debug", String(text)),
  info: (text) => host.log("info", String(text)),
  warn: (text) => host.log("warn", String(text)),
  error: (text) => host.log("error", String(text)),
};

function reply(out) {
  if (out === undefined || out === null) return undefined;
  if (out instanceof Reply) return { headers: witHeaders(out.headers), payload: bytes(out.payload) };
  if (typeof out === "string" || isBytes(out)) return { headers: [], payload: bytes(out) };
  throw new TypeError(`a handler returns nothing, a Reply, a string or a Uint8Array, not ${typeof out}`);
}

// What the component returns as `err`: an object whose own `payload` is
// the WIT variant (a thrown Error without one would trap).
function failure(tag, message) {
  return { payload: { tag, val: String(message || `${tag} failure`) } };
}

function failed(e) {
  // Only a handler error passes as it is (a host error, or a library's
  // error with a `payload`, would not lower as one).
  const tag = e && e.payload && e.payload.tag;
  if (tag === "retryable" || tag === "permanent") return e;
  if (e instanceof Permanent) return failure("permanent", e.message);
  if (e instanceof Retryable) return failure("retryable", e.message);
  // An uncaught exception: retryable, like a panic.
  const why = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return failure("retryable", why);
}

function handleOne(msg) {
  if (registered === null) {
    throw failure("permanent", "no function is registered with sluice.handler");
  }
  let out;
  try {
    out = registered(msg);
  } catch (e) {
    throw failed(e);
  }
  try {
    return reply(out);
  } catch (e) {
    // A value no reply can be made of: a bug a retry cannot fix (as for
    // a batch handler's item).
    throw failure("permanent", e.message);
  }
}

// One outcome of a batch handler as a WIT result.
function itemResult(out) {
  if (out instanceof Error) return { tag: "err", val: failed(out).payload };
  try {
    return { tag: "ok", val: reply(out) };
  } catch (e) {
    return { tag: "err", val: failure("permanent", e.message).payload };
  }
}

/** The component's export: calls the registered handler. */
export function handle(raw) {
  if (registered === null && registeredBatch !== null) {
    // A route without `batch`: a batch of one.
    let outcomes;
    try {
      // Not in a batch: a plain publish is this message's.
      outcomes = Array.from(registeredBatch([new Message(raw)]));
    } catch (e) {
      throw failed(e);
    }
    if (outcomes.length !== 1) {
      throw failure("permanent", `the batch handler gave ${outcomes.length} outcomes for 1 message`);
    }
    const result = itemResult(outcomes[0]);
    if (result.tag === "err") throw { payload: result.val };
    return result.val;
  }
  return handleOne(new Message(raw));
}

// While a batch handler runs, a plain `publish` belongs to no message: the
// host refuses it and runs the batch again one message at a time.
let inBatchHandler = false;

/** True while a function registered with `batchHandler` runs. */
export function inBatch() {
  return inBatchHandler;
}

function runBatch(batch) {
  inBatchHandler = true;
  try {
    return registeredBatch(batch);
  } finally {
    inBatchHandler = false;
  }
}

/** A batch export over `handleRaw` (a component's `handle`): the function
 *  registered with `batchHandler` if any, else `handleRaw` once per
 *  message, what it publishes belonging to that message. */
export function batchFrom(handleRaw) {
  return (raws) => {
    if (registeredBatch !== null) {
      const batch = Array.from(raws, (raw, i) => new Message(raw, i));
      let outcomes;
      try {
        outcomes = Array.from(runBatch(batch));
      } catch (e) {
        const why = failed(e).payload;
        return batch.map(() => ({ tag: "err", val: why }));
      }
      // An array of another length fails every message (the host says so).
      return outcomes.map(itemResult);
    }
    return Array.from(raws, (raw, i) => {
      current = i;
      try {
        return { tag: "ok", val: handleRaw(raw) };
      } catch (e) {
        return { tag: "err", val: failed(e).payload };
      } finally {
        current = null;
      }
    });
  };
}

/** The component's batch export (routes with `batch`): one outcome per
 *  message, in order. */
export const handleBatch = batchFrom(handle);

#!/usr/bin/env node
// Calls agent_workers.predict from Node.js without any Python: celery-ts publishes Celery protocol-2 messages to the
// broker (Redis or RabbitMQ), and the results are read from the Redis result backend in Celery's format
// (docs/tasks.md, "Results").
//
//   npm ci
//   AGENT_WORKERS_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// node producer.js house '[[0.5, -1, 2], [1, 0, 0]]'
//   node producer.js --uint8 3,8,8 cnn '[[0, 255, ...192 pixels...]]'   # typed: each row a uint8 tensor (b64)
//   node producer.js --png --top-k 3 digits '["digit.png"]'         # raw: each row a PNG file, top 3 labels
//   node producer.js --text --top-k 2 order '["the a cat sat on b"]'  # raw: each row a sentence
//
// With --uint8 SHAPE, each row is the pixels of one image, flat, row-major; they travel as a typed tensor,
// {"dtype": "uint8", "shape": SHAPE, "b64": <base64 of the raw bytes>} (contract 1.2, docs/tasks.md "Typed
// tensors"): 4/3 of the pixel bytes, where a JSON list of the same pixels takes 3-4x.
//
// With --png each row is the path of an image file, sent as raw input {"image": {"b64": <the file's bytes>}}; with
// --text each row is a sentence, sent as {"text": ...} (contract 1.3, docs/tasks.md "Raw inputs and built-in
// outputs": the model's preprocess hook decodes them). --top-k K asks for the K best labels with softmax scores.
//
// Prints one JSON array with one {"id", "status", "result"} per row; result is the task's result or, for a
// failure, Celery's error payload {"exc_type", "exc_message", "exc_module"}.
// Exit status: 0 all succeeded, 1 some failed, 2 usage, timeout or connection error.
"use strict";

const { randomUUID } = require("crypto");
const fs = require("fs");
const celery = require("celery-ts");
const Redis = require("ioredis");

const BROKER = process.env.AGENT_WORKERS_BROKER_URL || "redis://127.0.0.1:6379/0";
const BACKEND = process.env.AGENT_WORKERS_RESULT_BACKEND || "redis://127.0.0.1:6379/1";
const QUEUE = process.env.AGENT_WORKERS_INFERENCE_QUEUE || "inference";
const READY = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
const META = "celery-task-meta-";

// celery-ts gives every message the delivery tag "celery"; kombu's Redis transport keys its unacknowledged-message
// bookkeeping (the `unacked` hash) by that tag, so with several messages in flight each entry overwrites the last
// and a worker that dies would leave only one of them to be restored. Give each message its own tag, as kombu does.
const createProperties = celery.Task.prototype.createProperties;
celery.Task.prototype.createProperties = function createPropertiesWithTag(options) {
  return { ...createProperties.call(this, options), delivery_tag: randomUUID() };
};

/**
 * Wait for the result records of `ids` (in order). SUBSCRIBE to their channels, and once Redis has confirmed the
 * subscription, MGET the keys: the backend stores a record before it publishes it, so a record published before we
 * listened is already stored, and every later one arrives as a message.
 */
async function collect(redisUrl, ids, timeoutMs) {
  const sub = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 });
  const reader = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 });
  const records = new Map();
  let finish;
  const done = new Promise((resolve) => { finish = resolve; });
  const wanted = new Set(ids);
  const take = (channel, raw) => {
    const id = channel.slice(META.length);
    if (raw == null || !wanted.has(id) || records.has(id)) return;
    const record = JSON.parse(raw);
    if (!READY.has(record.status)) return; // STARTED, RETRY: keep waiting
    records.set(id, record);
    if (records.size === ids.length) finish();
  };
  let timer;
  try {
    await Promise.all([sub.connect(), reader.connect()]);
    sub.on("message", take);
    const keys = ids.map((id) => META + id);
    await sub.subscribe(...keys);
    (await reader.mget(...keys)).forEach((raw, i) => take(keys[i], raw));
    if (records.size < ids.length) {
      const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(
          `${ids.length - records.size} of ${ids.length} results not ready after ${timeoutMs / 1000}s`)), timeoutMs);
      });
      await Promise.race([done, timeout]);
    }
    return ids.map((id) => records.get(id));
  } finally {
    clearTimeout(timer);
    sub.disconnect();
    reader.disconnect();
  }
}

/** A typed tensor of contract 1.2: the raw little-endian bytes of `array` (a typed array), base64-encoded. */
function tensor(dtype, shape, array) {
  const bytes = Buffer.from(array.buffer, array.byteOffset, array.byteLength);
  return { dtype, shape, b64: bytes.toString("base64") };
}

async function main(argv) {
  let shape = null;
  let raw = null;
  let topK = null;
  for (;;) {
    if (argv[0] === "--uint8") {
      shape = (argv[1] || "").split(",").map(Number);
      argv = argv.slice(2);
    } else if (argv[0] === "--png" || argv[0] === "--text") {
      raw = argv[0].slice(2);
      argv = argv.slice(1);
    } else if (argv[0] === "--top-k") {
      topK = Number(argv[1]);
      argv = argv.slice(2);
    } else break;
  }
  const [model, rowsJson, timeoutArg] = argv;
  if (!model || !rowsJson || (shape && !shape.every((d) => Number.isInteger(d) && d > 0)) ||
      (topK !== null && !(Number.isInteger(topK) && topK > 0))) {
    console.error("usage: node producer.js [--uint8 D1,D2,... | --png | --text] [--top-k K] MODEL ROWS_JSON " +
                  "[TIMEOUT_SECONDS]");
    return 2;
  }
  let rows = JSON.parse(rowsJson);
  if (shape) rows = rows.map((row) => tensor("uint8", shape, Uint8Array.from(row.flat(Infinity))));
  if (raw === "png") rows = rows.map((path) => ({ image: { b64: fs.readFileSync(path).toString("base64") } }));
  if (raw === "text") rows = rows.map((text) => ({ text }));
  const kwargs = topK === null ? {} : { options: { top_k: topK, softmax: true } };
  // Not celery-ts's Redis result backend: it PSUBSCRIBEs to every result of every application and waits forever
  // for a FAILURE stored before it asked (dist/redis/backend.js); collect() reads the records instead. Its
  // NullBackend rejects every result at once, so hand celery-ts a backend whose results never settle.
  const readBelow = {
    get: () => new Promise(() => {}),
    put: async () => "",
    delete: async () => "",
    disconnect: async () => {},
    end: async () => {},
    uri: () => BACKEND,
  };
  const client = new celery.Client({ brokers: [celery.createBroker(BROKER)], backend: readBelow, id: randomUUID() });
  try {
    const task = client.createTask("agent_workers.predict");
    // Positional (model, inputs) as in docs/tasks.md, options by keyword; protocol 2 needs kwargs present, even empty.
    const ids = rows.map((row) => task.applyAsync({ args: [model, row], kwargs, queue: QUEUE }).taskId);
    const records = await collect(BACKEND, ids, 1000 * Number(timeoutArg || 60));
    console.log(JSON.stringify(records.map((r, i) => ({ id: ids[i], status: r.status, result: r.result }))));
    return records.every((r) => r.status === "SUCCESS") ? 0 : 1;
  } finally {
    await client.end().catch(() => {});
  }
}

// celery-ts publishes without awaiting (Task.applyAsync), so a broker error surfaces as an unhandled rejection.
process.on("unhandledRejection", (error) => {
  console.error(`error: ${error && error.message ? error.message : error}`);
  process.exit(2);
});

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`error: ${error.message}`);
    process.exit(2);
  },
);

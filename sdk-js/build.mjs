#!/usr/bin/env node
// Builds a JavaScript plugin into a component:
//   node sdk-js/build.mjs PLUGIN_DIR OUT.wasm
// PLUGIN_DIR/app.js imports "sluice-sdk"; it is bundled with the SDK into
// one module (the component's engine loads a single source), then
// componentize-js builds it against the sluice:plugin/batch-handler world:
// the plugin's exports (`handle`) plus the SDK's `handleBatch`, so every
// plugin takes a route's batches in one call.

import { build } from "esbuild";
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const [pluginDir, out] = process.argv.slice(2);
if (!pluginDir || !out) {
  console.error("usage: build.mjs PLUGIN_DIR OUT.wasm");
  process.exit(2);
}

const app = JSON.stringify(join(resolve(pluginDir), "app.js"));
const bundled = await build({
  // The plugin's exports, and `handleBatch`: its own if it has one, else
  // one calling its `handle` per message (publishes attributed to each).
  stdin: {
    contents: [
      `import * as app from ${app};`,
      `import { batchFrom } from "sluice-sdk";`,
      `export * from ${app};`,
      `export const handleBatch = app.handleBatch ?? batchFrom(app.handle);`,
    ].join("\n"),
    resolveDir: resolve(pluginDir),
    sourcefile: "entry.js",
  },
  bundle: true,
  format: "esm",
  platform: "neutral",
  write: false,
  // The host interface is the component's import, not a file.
  external: ["sluice:*"],
  alias: { "sluice-sdk": join(here, "index.js") },
  logLevel: "warning",
  // `app.handleBatch` is undefined for most plugins: that is the point.
  logOverride: { "import-is-undefined": "silent" },
});

const { component } = await componentize(bundled.outputFiles[0].text, {
  witPath: resolve(here, "..", "wit"),
  worldName: "batch-handler",
  // Only what the WIT world asks for: no HTTP, no fetch event.
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);

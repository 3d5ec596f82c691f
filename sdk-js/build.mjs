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
  // An explicit export wins over `export *`: a plugin may export its own.
  stdin: {
    contents: `export * from ${app};\nexport { handleBatch } from "sluice-sdk";\n`,
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
});

const { component } = await componentize(bundled.outputFiles[0].text, {
  witPath: resolve(here, "..", "wit"),
  worldName: "batch-handler",
  // Only what the WIT world asks for: no HTTP, no fetch event.
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);

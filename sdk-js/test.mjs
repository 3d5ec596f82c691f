#!/usr/bin/env node
// Runs a JavaScript plugin's own tests in Node:
//   node sdk-js/test.mjs PLUGIN_DIR
// Each PLUGIN_DIR/*.test.js is bundled with the SDK, its host calls going
// to the test host (testing.js), then run with `node --test`.

import { build } from "esbuild";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pluginDir = process.argv[2];
if (!pluginDir) {
  console.error("usage: test.mjs PLUGIN_DIR");
  process.exit(2);
}
const tests = readdirSync(pluginDir).filter((f) => f.endsWith(".test.js"));
if (tests.length === 0) {
  console.error(`no *.test.js in ${pluginDir}`);
  process.exit(1);
}
const out = mkdtempSync(join(tmpdir(), "sluice-js-test-"));
const testHost = {
  name: "sluice-test-host",
  setup(b) {
    b.onResolve({ filter: /^sluice:plugin\/host/ }, () => ({ path: join(here, "testing.js") }));
  },
};
try {
  await build({
    entryPoints: tests.map((t) => join(resolve(pluginDir), t)),
    bundle: true,
    format: "esm",
    platform: "node",
    outdir: out,
    outExtension: { ".js": ".mjs" },
    alias: { "sluice-sdk/testing": join(here, "testing.js"), "sluice-sdk": join(here, "index.js") },
    plugins: [testHost],
    logLevel: "warning",
  });
  const files = readdirSync(out).map((f) => join(out, f));
  const run = spawnSync(process.execPath, ["--test", ...files], { stdio: "inherit" });
  process.exitCode = run.status ?? 1;
} finally {
  rmSync(out, { recursive: true, force: true });
}

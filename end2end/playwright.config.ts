import { defineConfig } from "@playwright/test";
import { freePort } from "./support.mjs";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

// The config is evaluated by the runner and again by every worker: values chosen
// here are put into the environment once, so workers inherit the runner's.
process.env.TOLLGATE_E2E_PORT ??= String(await freePort());
process.env.TOLLGATE_E2E_DIR ??= mkdtempSync(join(tmpdir(), "tollgate-e2e-"));
const port = process.env.TOLLGATE_E2E_PORT;
const dir = process.env.TOLLGATE_E2E_DIR;
const bin = process.env.TOLLGATE_BIN ?? resolve("..", "target", "release", "tollgate");
export const baseURL = `http://127.0.0.1:${port}`;

export default defineConfig({
  testDir: "./tests",
  globalSetup: "./global-setup.ts",
  timeout: 30_000,
  fullyParallel: false,
  workers: 1,
  forbidOnly: !!process.env.CI,
  reporter: [["list"]],
  use: {
    baseURL,
    trace: "retain-on-failure",
    launchOptions: {
      // Debian's Chromium; Playwright never downloads a browser here.
      executablePath: "/usr/bin/chromium",
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
      ],
    },
  },
  webServer: {
    // The real release binary, on a free port, with a fresh SQLite file.
    command: `${bin} serve --listen 127.0.0.1:${port} --database-url sqlite://${dir}/tollgate.db`,
    url: `${baseURL}/healthz`,
    reuseExistingServer: false,
    stdout: "pipe",
    stderr: "pipe",
    timeout: 60_000,
  },
});

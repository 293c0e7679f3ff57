// Screenshot of the Token Limits tab, for reviews and docs.
//
//   ./dev build && node end2end/screenshot.mjs /tmp/token-limits.png
//
// Starts the release binary on a free port with a fresh SQLite file, adds the demo
// data (`tollgate demo`), signs in as the demo administrator in Debian's Chromium,
// saves a full-page PNG to the given path and stops the server.
//
//   node end2end/screenshot.mjs /tmp/replay.png --base http://127.0.0.1:8090 \
//        --email replay@example.com --password PASSWORD
//
// Shoots a server that is already running instead (`./dev replay` prints this).
import { chromium } from "playwright-core";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { freePort, waitUntilHealthy } from "./support.mjs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: { base: { type: "string" }, email: { type: "string" }, password: { type: "string" } },
});
const out = positionals[0] ?? "token-limits.png";
const bin = process.env.TOLLGATE_BIN ?? resolve(import.meta.dirname, "..", "target", "release", "tollgate");
let base = flags.base?.replace(/\/+$/, "");
const email = flags.email ?? "admin@example.com";
const password = flags.password ?? "screenshot password";
let server = null;
if (!base) {
  const dir = mkdtempSync(join(tmpdir(), "tollgate-shot-"));
  const db = `sqlite://${dir}/tollgate.db`;
  const port = await freePort();
  execFileSync(bin, ["--database-url", db, "demo"], { env: { ...process.env, TOLLGATE_PASSWORD: password } });
  server = spawn(bin, ["--database-url", db, "serve", "--listen", `127.0.0.1:${port}`], { stdio: "ignore" });
  base = `http://127.0.0.1:${port}`;
}
try {
  await waitUntilHealthy(base);
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  await page.goto(`${base}/login?next=%2Fadmin%2Ftoken-limits`);
  await page.locator("#app[data-hydrated=true]").waitFor();
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#spent").waitFor();
  await page.screenshot({ path: out, fullPage: true });
  await browser.close();
  console.log(`saved ${out}`);
} finally {
  server?.kill("SIGTERM");
}

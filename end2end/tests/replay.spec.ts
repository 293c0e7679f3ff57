import { test, expect, type Page } from "@playwright/test";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { freePort, waitUntilHealthy } from "../support.mjs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

// Ten minutes of the Azure trace (3,871 requests) replayed through the real binary
// on its own database; then the Token Limits tab must show what the replay's
// summary reports: total spend, each model's amount and share, and the status.

const bin = process.env.TOLLGATE_BIN ?? resolve("..", "target", "release", "tollgate");
const PASSWORD = "replay end-to-end password";
const EMAIL = "replay@example.com";
const NAMES: Record<string, string> = {
  "gpt-5": "GPT-5",
  "claude-sonnet-4-5": "Claude Sonnet 4.5",
  "gpt-5.4": "GPT-5.4",
};
// The scenario of server/data/replay.toml, sized for ten minutes (about 20.64 EUR
// at the requested models): the cap, the budget and the allowance are all reached.
const BUDGET = 8n;
const OVERAGE = 4n;
const CAP = 5n;
const NANO = 1_000_000_000n;

type ModelSpend = { model: string; books_nanos: number; priced_nanos: number; requests: number };
type Summary = {
  sent: number;
  served_fallback: number;
  refused: Record<string, number>;
  models: ModelSpend[];
  total_books_nanos: number;
  total_priced_nanos: number;
  ledger_equals_counters: boolean;
  reserved_nanos: number;
};

// `€1,234.56`: nano-euros rounded to cents half away from zero (R2), grouped in thousands.
function eur(nanos: bigint): string {
  const cents = (nanos + 5_000_000n) / 10_000_000n;
  const whole = (cents / 100n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `€${whole}.${(cents % 100n).toString().padStart(2, "0")}`;
}

// Shares in tenths of a percent by largest remainder (R8): floors first, then the
// tenths left go to the largest remainders, ties to the larger amount, then by name.
function shares(rows: { name: string; nanos: bigint }[]): Map<string, string> {
  const total = rows.reduce((sum, r) => sum + r.nanos, 0n);
  const parts = rows.map((r) => ({ ...r, tenths: (r.nanos * 1000n) / total, rest: (r.nanos * 1000n) % total }));
  let left = 1000n - parts.reduce((sum, p) => sum + p.tenths, 0n);
  const order = [...parts].sort((a, b) =>
    a.rest !== b.rest
      ? b.rest > a.rest ? 1 : -1
      : a.nanos !== b.nanos ? (b.nanos > a.nanos ? 1 : -1) : a.name.localeCompare(b.name),
  );
  for (const p of order) {
    if (left > 0n) {
      p.tenths += 1n;
      left -= 1n;
    }
  }
  return new Map(parts.map((p) => [p.name, `${p.tenths / 10n}.${p.tenths % 10n}%`]));
}

let base = "";
let summary: Summary;
const children: ChildProcess[] = [];

test.beforeAll(async () => {
  test.setTimeout(300_000);
  // Inside the suite's folder, which `./dev e2e` removes when the tests end.
  const dir = mkdtempSync(join(process.env.TOLLGATE_E2E_DIR ?? tmpdir(), "replay-"));
  const [mockPort, port] = [await freePort(), await freePort()];
  base = `http://127.0.0.1:${port}`;
  const swaps: Record<string, string> = {
    listen: `127.0.0.1:${port}`,
    database_url: `sqlite://${dir}/tollgate.db`,
    base_url: `http://127.0.0.1:${mockPort}/v1`,
    budget_eur: `${BUDGET}.00`,
    overage_eur: `${OVERAGE}.00`,
  };
  const config = readFileSync(resolve("..", "server", "data", "replay.toml"), "utf8")
    .split("\n")
    .map((line) => {
      const key = Object.keys(swaps).find((k) => line.startsWith(`${k} =`));
      return key ? `${key} = "${swaps[key]}"` : line;
    })
    .join("\n");
  const configPath = join(dir, "replay.toml");
  writeFileSync(configPath, config);
  const env = { ...process.env, TOLLGATE_CONFIG: configPath, TOLLGATE_LOG: "warn" };
  const run = (...args: string[]) => execFileSync(bin, args, { env }).toString().trim();

  execFileSync(bin, ["user", "create", "--email", EMAIL, "--role", "admin"], {
    env: { ...env, TOLLGATE_PASSWORD: PASSWORD },
  });
  const key = run("key", "create", "--email", EMAIL, "--name", "replay");
  run("limit", "set", "claude-sonnet-4-5", "--eur", CAP.toString());
  run("fallback", "on");
  children.push(spawn(bin, ["replay", "mock-upstream", "--listen", `127.0.0.1:${mockPort}`], { env, stdio: "ignore" }));
  children.push(spawn(bin, ["serve"], { env, stdio: "ignore" }));
  await waitUntilHealthy(base);
  const json = join(dir, "replay.json");
  // Exits non-zero (and fails this setup) when the books disagree with the traffic.
  const printed = run("replay", "run", "--gateway", base, "--key", key, "--minutes", "10", "--speedup", "60", "--json", json);
  console.log(printed);
  summary = JSON.parse(readFileSync(json, "utf8")).summary;
});

test.afterAll(() => {
  for (const child of children) child.kill("SIGTERM");
});

async function openTab(page: Page) {
  await page.goto(`${base}/login?next=%2Fadmin%2Ftoken-limits`);
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await page.getByLabel("Email").fill(EMAIL);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
}

test("after a replay the tab shows its spend, shares and status", async ({ page }) => {
  // The replay went through every state of the scenario and its books are whole.
  expect(summary.sent).toBe(3871);
  expect(summary.served_fallback).toBeGreaterThan(0);
  expect(summary.refused["plan_limit_reached"] ?? 0).toBeGreaterThan(0);
  expect(summary.ledger_equals_counters).toBe(true);
  expect(summary.reserved_nanos).toBe(0);
  expect(summary.total_books_nanos).toBe(summary.total_priced_nanos);

  const total = BigInt(summary.total_books_nanos);
  const spending = summary.models.filter((m) => m.books_nanos > 0);
  expect(spending.map((m) => m.model).sort()).toEqual(["claude-sonnet-4-5", "gpt-5", "gpt-5.4"]);
  expect(BigInt(spending.find((m) => m.model === "claude-sonnet-4-5")!.books_nanos)).toBeLessThanOrEqual(CAP * NANO);
  const expectedShares = shares(spending.map((m) => ({ name: NAMES[m.model], nanos: BigInt(m.books_nanos) })));
  const allowance = (BUDGET + OVERAGE) * NANO;
  expect(total).toBeGreaterThan(BUDGET * NANO);
  expect(total).toBeLessThanOrEqual(allowance);
  // R4: "Limit reached" only at spent ≥ allowance. Admission refuses a request that
  // would pass the allowance, so spend usually stops just short of it.
  const status = total >= allowance ? "Limit reached" : "Using overage";

  await openTab(page);
  await expect(page.locator("#spent")).toHaveText(eur(total));
  await expect(page.locator("#status")).toHaveText(status);
  await expect(page.locator("#spent-of-allowance")).toHaveText(`${eur(total)} of ${eur(allowance)}`);
  const rows = page.locator("ul.by-model li");
  await expect(rows).toHaveCount(spending.length);
  const ordered = [...spending].sort((a, b) => b.books_nanos - a.books_nanos);
  for (const [i, model] of ordered.entries()) {
    const name = NAMES[model.model];
    const amount = eur(BigInt(model.books_nanos));
    await expect(rows.nth(i)).toContainText(`${name}${amount}${expectedShares.get(name)}`);
    await expect(page.locator(`tr[data-model="${model.model}"] td`).first()).toHaveText(amount);
  }
});

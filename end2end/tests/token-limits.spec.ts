import { test, expect, type Cookie, type Page } from "@playwright/test";
import { execFileSync } from "node:child_process";
import { resolve } from "node:path";
import { PASSWORD } from "../global-setup";

const bin = process.env.TOLLGATE_BIN ?? resolve("..", "target", "release", "tollgate");
const dbUrl = () => `sqlite://${process.env.TOLLGATE_E2E_DIR}/tollgate.db`;
const cli = (...args: string[]) => execFileSync(bin, ["--database-url", dbUrl(), ...args]).toString();

async function signIn(page: Page, email: string) {
  await page.goto("/admin/token-limits");
  // Anonymous visitors are sent to the login page, which remembers where they were going.
  await expect(page).toHaveURL(/\/login\?next=%2Fadmin%2Ftoken-limits$/);
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
}

/** The administrator's session, once signed in: the tests after the first reuse
 * it, since every sign-in of the suite comes from one address, whose attempts
 * the server limits (a burst of 10). */
let adminSession: Cookie[] | null = null;

async function openTab(page: Page) {
  const reused = adminSession !== null;
  if (adminSession) {
    await page.context().addCookies(adminSession);
    await page.goto("/admin/token-limits");
  } else {
    await signIn(page, "admin@example.com");
  }
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  // Taken once signed in: the session cookie is set by the sign-in's answer.
  if (!reused) adminSession = await page.context().cookies();
}

const limitInput = (page: Page, name: string) => page.getByLabel(`Limit for ${name} in euros`, { exact: true });
const enabledSwitch = (page: Page, name: string) =>
  page.getByRole("switch", { name: `Enable the limit for ${name}`, exact: true });

/** `url` with the error it carries back (`__err`) rewritten by `forge`: what
 * anyone could send an administrator as a link. */
function forgedErrorUrl(url: string, forge: (error: any) => any): string {
  const forged = new URL(url);
  const carried = forged.searchParams.get("__err");
  expect(carried, `an error in ${url}`).toBeTruthy();
  const error = JSON.parse(Buffer.from(carried!, "base64url").toString("utf8"));
  const encoded = Buffer.from(JSON.stringify(forge(error)), "utf8")
    .toString("base64")
    .replaceAll("+", "-")
    .replaceAll("/", "_");
  forged.searchParams.set("__err", encoded);
  return forged.toString();
}

const PHISH = "Your session expired: sign in again at https://evil.example";

/** Every sentence of a server function's error replaced by PHISH. */
const phishing = (error: any) => ({
  ...error,
  message: PHISH,
  fields: (error.fields ?? []).map((f: any) => ({ ...f, message: PHISH })),
});

test.describe.configure({ mode: "serial" });

/** The question the tab asks before a link leaves it with changes not saved
 * (`app::ui::LEAVE_QUESTION`). */
const LEAVE_QUESTION = "Your changes on this page are not saved. Leave the page and lose them?";

/** Holds every request to `url` (a glob) on its way until the returned
 * function lets them through. */
async function holdRequests(page: Page, url: string): Promise<() => void> {
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  await page.route(url, async (route) => {
    await held;
    await route.continue();
  });
  return release;
}

/** A form's line after a save, once the form holds changes made since. */
const SAVED_BEFORE_CHANGES = "Saved. The changes made since are not saved yet.";

/** Answers every dialog the page opens from now on (`accept` or `dismiss`),
 * and returns the list their messages are put in (the type, for the
 * browser's own question before an unload, whose words are its own). */
function answerDialogs(page: Page, answer: "accept" | "dismiss"): string[] {
  const asked: string[] = [];
  page.removeAllListeners("dialog");
  page.on("dialog", async (dialog) => {
    asked.push(dialog.type() === "beforeunload" ? "beforeunload" : dialog.message());
    await dialog[answer]();
  });
  return asked;
}

test("an administrator sees the three sections with the seeded usage", async ({ page }) => {
  await openTab(page);
  await expect(page.getByRole("heading", { name: "Spending & Budget" })).toBeVisible();
  await expect(page.getByRole("heading", { name: "Model limits" })).toBeVisible();
  await expect(page.getByRole("heading", { name: "Spend by model (this cycle)" })).toBeVisible();
  // Demo usage at the demo prices (EUR per 1M tokens, input / output):
  //   Claude Sonnet 4.5 2.58 / 12.9: 2M in + 0.2M out = 5.16 + 2.58 = 7.74
  //   GPT-5 Mini       0.215 / 1.72: 4M in + 1M out   = 0.86 + 1.72 = 2.58
  //   GPT-5            1.075 / 8.6:  1M in + 0.1M out = 1.075 + 0.86 = 1.935
  // Total 12.255 EUR, shown to the cent half away from zero: €12.26.
  await expect(page.locator("#spent")).toHaveText("€12.26");
  await expect(page.locator("#plan-budget")).toHaveText("€500.00");
  await expect(page.locator("#overage-limit")).toHaveText("€100.00");
  await expect(page.locator("#status")).toHaveText("Within plan budget");
  await expect(page.locator("#spent-of-allowance")).toHaveText("€12.26 of €600.00");
  await expect(page.locator("#used-percent")).toHaveText("2.0%");
  // Shares 63.157…, 21.052…, 15.789… floored to 63.1 + 21.0 + 15.7 = 99.8; the two
  // tenths left go to the largest remainders (GPT-5, then Claude): sum 100.0.
  const rows = page.locator("ul.by-model li");
  await expect(rows).toHaveCount(3);
  await expect(rows.nth(0)).toContainText("Claude Sonnet 4.5€7.7463.2%");
  await expect(rows.nth(1)).toContainText("GPT-5 Mini€2.5821.0%");
  await expect(rows.nth(2)).toContainText("GPT-5€1.94" + "15.8%");
  await expect(page.locator('tr[data-model="gpt-5"] td').first()).toHaveText("€1.94");
});

test("a limit typed as 12,50 is saved, shown as €12.50 and audited", async ({ page }) => {
  await openTab(page);
  await limitInput(page, "GPT-5").fill("12,50");
  await enabledSwitch(page, "GPT-5").check();
  await page.locator("#save-limits").click();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  // The field shows the saved amount as the server writes it, without a reload.
  await expect(limitInput(page, "GPT-5")).toHaveValue("€12.50");
  await page.reload();
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await expect(limitInput(page, "GPT-5")).toHaveValue("€12.50");
  await expect(enabledSwitch(page, "GPT-5")).toBeChecked();
  // €1.94 spent of €12.50: room left, so no "Limit reached" on the row.
  await expect(page.locator('tr[data-model="gpt-5"] .badge')).toHaveCount(0);
  const audit = cli("audit");
  expect(audit).toContain("admin@example.com\tmodel_limit\tgpt-5");
  expect(audit).toContain('"limit_eur":"12.5"');
});

test("a model whose limit is used up is flagged on its row", async ({ page }) => {
  // GPT-5 Mini has €2.58 of demo usage: a €1 cap is used up.
  cli("limit", "set", "gpt-5-mini", "--eur", "1");
  await openTab(page);
  await expect(page.locator('tr[data-model="gpt-5-mini"] .badge')).toHaveText("Limit reached");
  cli("limit", "clear", "gpt-5-mini");
});

test("invalid limits show their messages and change nothing", async ({ page }) => {
  await openTab(page);
  const auditBefore = cli("audit");
  const cases: Array<[string, string, RegExp]> = [
    ["GPT-4o", "-5", /negative/i],
    ["GPT-5 Mini", "abc", /using digits/i],
    ["GPT-5.4 Mini", "1.234", /ambiguous/i],
    ["Claude Sonnet 4.5", "", /before enabling/i],
  ];
  for (const [name, text] of cases) {
    await limitInput(page, name).fill(text);
    await enabledSwitch(page, name).check();
  }
  await page.locator("#save-limits").click();
  await expect(page.locator("#limits-result")).toContainText("Nothing was saved");
  // The keyboard is taken to the first refused field in the rows' order.
  await expect(limitInput(page, "Claude Sonnet 4.5")).toBeFocused();
  for (const [name, , message] of cases) {
    const input = limitInput(page, name);
    await expect(input).toHaveAttribute("aria-invalid", "true");
    const errorId = await input.getAttribute("aria-describedby");
    await expect(page.locator(`[id="${errorId}"]`)).toHaveText(message);
  }
  // What was typed stays in the form; nothing reached the database.
  await expect(limitInput(page, "GPT-4o")).toHaveValue("-5");
  expect(cli("audit")).toBe(auditBefore);
  await page.reload();
  await expect(limitInput(page, "GPT-4o")).toHaveValue("");
  await expect(limitInput(page, "GPT-5")).toHaveValue("€12.50");
});

test("automatic fallback is saved and survives a reload", async ({ page }) => {
  await openTab(page);
  const toggle = page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" });
  await expect(toggle).toBeChecked();
  await toggle.uncheck();
  await page.locator("#save-fallback").click();
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  await page.reload();
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await expect(toggle).not.toBeChecked();
  expect(cli("audit")).toContain("settings.automatic_fallback");
});

test("a double click on Save saves once, and is not refused as stale", async ({ page }) => {
  await openTab(page);
  // Each save answered late, as over a slow network: the second click of the
  // double click lands while the first save is under way.
  let saves = 0;
  await page.route("**/fn/save_automatic_fallback", async (route) => {
    saves += 1;
    await new Promise((done) => setTimeout(done, 500));
    await route.continue();
  });
  await page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" }).click();
  const save = page.getByRole("button", { name: "Save automatic fallback" });
  await save.dblclick();
  await expect(save).toBeDisabled();
  await expect(save).toHaveText("Saving…");
  // Unavailable, yet still where the keyboard left off.
  await expect(save).toBeFocused();
  await page.keyboard.press("Enter");
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  await expect(save).toBeEnabled();
  expect(saves).toBe(1);
  await page.unroute("**/fn/save_automatic_fallback");
});

test("a save the browser cannot carry says so in the panel's words", async ({ page }) => {
  await openTab(page);
  await page.route("**/fn/save_model_limits", (route) => route.abort("failed"));
  await limitInput(page, "GPT-4o").fill("21");
  await page.getByRole("button", { name: "Save model limits" }).click();
  const result = page.locator("#limits-result");
  await expect(result).toContainText("the server could not be reached");
  await expect(result).not.toContainText("Failed to fetch");
  // What was typed stays, to save again once the server is back.
  await expect(limitInput(page, "GPT-4o")).toHaveValue("21");
  await page.unroute("**/fn/save_model_limits");
});

test("saves of both forms in a row are each taken, none refused as stale", async ({ page }) => {
  await openTab(page);
  // The fallback's save first: the limits' saves after it must still reload
  // the versions they send.
  const toggle = page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" });
  await toggle.click();
  // Each Save is named for its form.
  const saveFallback = page.getByRole("button", { name: "Save automatic fallback" });
  await saveFallback.click();
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  // The section was drawn again with the saved numbers; the keyboard is
  // still on its Save.
  await expect(saveFallback).toBeFocused();
  const saveLimits = page.getByRole("button", { name: "Save model limits" });
  const field = limitInput(page, "GPT-4o");
  for (const [amount, byEnter] of [["33", false], ["34", true]] as const) {
    await field.fill(amount);
    if (byEnter) await field.press("Enter");
    else await saveLimits.click();
    // Shown as the server writes it once the tab has reloaded its numbers.
    await expect(field).toHaveValue(`€${amount}.00`);
    await expect(page.locator("#limits-result")).toHaveText("Saved.");
    // The keyboard is where it was: on Save, or in the field Enter was pressed in.
    await expect(byEnter ? field : saveLimits).toBeFocused();
  }
  expect(cli("audit", "--limit", "1")).toContain('"limit_eur":"34"');
  // A change made after the save is not called saved; the other form's answer
  // stays.
  await limitInput(page, "GPT-4o").fill("35");
  await expect(page.locator("#limits-result")).toHaveText(SAVED_BEFORE_CHANGES);
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  cli("limit", "clear", "gpt-4o");
});

test("a change typed in one form is kept when the other is saved, and still checked for conflicts", async ({ page }) => {
  await openTab(page);
  await limitInput(page, "GPT-5 Mini").fill("60");
  // Changed elsewhere meanwhile: the row being edited, and another.
  cli("limit", "set", "gpt-5-mini", "--eur", "5");
  cli("limit", "set", "gpt-4o", "--eur", "7");
  await page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" }).click();
  await page.getByRole("button", { name: "Save automatic fallback" }).click();
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  // The tab has reloaded its numbers (GPT-4o's new limit shows) and kept what was typed.
  await expect(limitInput(page, "GPT-4o")).toHaveValue("€7.00");
  await expect(limitInput(page, "GPT-5 Mini")).toHaveValue("60");
  // Saved as typed on the version it was typed on: refused, since the CLI changed it.
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#limits-result")).toContainText("these settings were changed since this page showed them");
  // The row that was changed meanwhile is marked, and the keyboard taken to it.
  const mini = limitInput(page, "GPT-5 Mini");
  await expect(mini).toHaveAttribute("aria-invalid", "true");
  await expect(page.locator('[id="limit-error-gpt-5-mini"]')).toHaveText(/Changed by someone else/);
  await expect(mini).toBeFocused();
  // The way to the current values drops the change typed: the page asks first.
  const asked = answerDialogs(page, "accept");
  await page.locator("#limits-result").getByRole("link", { name: "Load the current values" }).click();
  await expect(page.locator("#limits-result")).toHaveText("");
  await expect(limitInput(page, "GPT-5 Mini")).toHaveValue("€5.00");
  expect(asked).toEqual([LEAVE_QUESTION]);
  cli("limit", "clear", "gpt-5-mini");
  cli("limit", "clear", "gpt-4o");
});

test("what is typed before the page comes alive is kept, and taken as a change", async ({ page }) => {
  // The browser's half of the app held back: until it is let through, the
  // page is the server's HTML, which a visitor can already type into.
  const release = await holdRequests(page, "**/*.wasm");
  await page.context().addCookies(adminSession!);
  await page.goto("/admin/token-limits", { waitUntil: "commit" });
  await expect(limitInput(page, "GPT-4o")).toBeVisible();
  await expect(page.locator("#app")).toHaveAttribute("data-hydrated", "false");
  await limitInput(page, "GPT-4o").fill("31");
  await enabledSwitch(page, "GPT-4o").check();
  release();
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await expect(limitInput(page, "GPT-4o")).toHaveValue("31");
  await expect(enabledSwitch(page, "GPT-4o")).toBeChecked();
  // Taken as a change: kept when the other form's save draws the tab again.
  await page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" }).click();
  await page.getByRole("button", { name: "Save automatic fallback" }).click();
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  await expect(limitInput(page, "GPT-4o")).toHaveValue("31");
  await expect(enabledSwitch(page, "GPT-4o")).toBeChecked();
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  await expect(limitInput(page, "GPT-4o")).toHaveValue("€31.00");
  expect(cli("audit", "--limit", "1")).toContain('"limit_eur":"31"');
  cli("limit", "clear", "gpt-4o");
  cli("fallback", "on");
});

test("leaving the tab with changes not saved asks first", async ({ page }) => {
  await openTab(page);
  await limitInput(page, "GPT-4o").fill("33");
  // A link of the app, and Sign out: asked, and staying keeps the change.
  let asked = answerDialogs(page, "dismiss");
  await page.getByRole("link", { name: "Home" }).click();
  await page.getByRole("button", { name: "Sign out" }).click();
  await expect.poll(() => asked).toEqual([LEAVE_QUESTION, LEAVE_QUESTION]);
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(limitInput(page, "GPT-4o")).toHaveValue("33");
  await expect(page.getByRole("button", { name: "Sign out" })).toBeVisible();
  // Closing the tab: the browser asks in its own words.
  await page.close({ runBeforeUnload: true });
  await expect.poll(() => asked.length).toBe(3);
  expect(asked[2]).toBe("beforeunload");
  expect(page.isClosed()).toBe(false);
  // Leaving anyway: asked once, not again by the unload that follows.
  asked = answerDialogs(page, "accept");
  await page.getByRole("link", { name: "Home" }).click();
  await expect(page).toHaveURL(/\/$/);
  expect(asked).toEqual([LEAVE_QUESTION]);
  // Back and Forward between the app's pages: asked too.
  await page.getByRole("link", { name: "Admin" }).click();
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await limitInput(page, "GPT-4o").fill("35");
  asked = answerDialogs(page, "dismiss");
  await page.goBack();
  await expect.poll(() => asked).toEqual([LEAVE_QUESTION]);
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(limitInput(page, "GPT-4o")).toHaveValue("35");
  asked = answerDialogs(page, "accept");
  await page.goBack();
  await expect(page).toHaveURL(/\/$/);
  await expect(page.getByRole("link", { name: "Admin" })).toBeVisible();
  expect(asked).toEqual([LEAVE_QUESTION]);
  // Saved, or not changed: nothing to ask.
  await page.goBack();
  await expect(limitInput(page, "GPT-4o")).toHaveValue("");
  await limitInput(page, "GPT-4o").fill("34");
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  await page.getByRole("link", { name: "Home" }).click();
  await expect(page).toHaveURL(/\/$/);
  expect(asked).toEqual([LEAVE_QUESTION]);
  cli("limit", "clear", "gpt-4o");
});

test("a change made while a save is on its way is kept, and saved next", async ({ page }) => {
  await openTab(page);
  // The save held on its way until the changes below are made.
  const release = await holdRequests(page, "**/fn/save_model_limits");
  await limitInput(page, "GPT-4o").fill("5");
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#save-limits")).toHaveText("Saving…");
  await limitInput(page, "GPT-4o").fill("55");
  await limitInput(page, "GPT-5 Mini").fill("3");
  await enabledSwitch(page, "GPT-5 Mini").check();
  release();
  await expect(page.locator("#limits-result")).toHaveText(SAVED_BEFORE_CHANGES);
  await expect(page.locator("#save-limits")).toHaveText("Save");
  await page.unroute("**/fn/save_model_limits");
  expect(cli("audit", "--limit", "1")).toContain('"limit_eur":"5"');
  await expect(limitInput(page, "GPT-4o")).toHaveValue("55");
  await expect(limitInput(page, "GPT-5 Mini")).toHaveValue("3");
  await expect(enabledSwitch(page, "GPT-5 Mini")).toBeChecked();
  // Still changes not saved: leaving asks.
  const asked = answerDialogs(page, "dismiss");
  await page.getByRole("link", { name: "Home" }).click();
  expect(asked).toEqual([LEAVE_QUESTION]);
  // Saved next on the version the first save wrote: not refused as a conflict.
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  await expect(limitInput(page, "GPT-4o")).toHaveValue("€55.00");
  await expect(limitInput(page, "GPT-5 Mini")).toHaveValue("€3.00");
  // The amount on its way, written another way meanwhile: that is what is saved.
  const releaseAgain = await holdRequests(page, "**/fn/save_model_limits");
  await limitInput(page, "GPT-4o").fill("20");
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#save-limits")).toHaveText("Saving…");
  await limitInput(page, "GPT-4o").fill("20,00");
  releaseAgain();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  await page.unroute("**/fn/save_model_limits");
  await expect(limitInput(page, "GPT-4o")).toHaveValue("€20.00");
  await page.getByRole("link", { name: "Home" }).click();
  await expect(page).toHaveURL(/\/$/);
  expect(asked).toEqual([LEAVE_QUESTION]);
  cli("limit", "clear", "gpt-4o");
  cli("limit", "clear", "gpt-5-mini");
});

test("saves of both forms on their way at once each keep what was changed since", async ({ page }) => {
  await openTab(page);
  const fallback = page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" });
  await expect(fallback).toBeChecked();
  const release = await holdRequests(page, "**/fn/save_automatic_fallback");
  // The switch turned off and saved, held; the limits saved meanwhile; then
  // the switch turned on again before the held save lands.
  await fallback.click();
  await page.getByRole("button", { name: "Save automatic fallback" }).click();
  await expect(page.locator("#save-fallback")).toHaveText("Saving…");
  await limitInput(page, "GPT-5 Mini").fill("5");
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  await fallback.click();
  await expect(fallback).toBeChecked();
  release();
  await expect(page.locator("#save-fallback")).toHaveText("Save");
  await page.unroute("**/fn/save_automatic_fallback");
  expect(cli("spend")).toContain("automatic fallback\toff");
  // Shown as turned, not as saved, and still a change to ask about and to save.
  await expect(fallback).toBeChecked();
  const asked = answerDialogs(page, "dismiss");
  await page.getByRole("link", { name: "Home" }).click();
  expect(asked).toEqual([LEAVE_QUESTION]);
  await page.getByRole("button", { name: "Save automatic fallback" }).click();
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  expect(cli("spend")).toContain("automatic fallback\ton");
  cli("limit", "clear", "gpt-5-mini");
});

test("a change undone, or typed as the saved amount, leaves nothing to ask about", async ({ page }) => {
  cli("limit", "set", "gpt-4o", "--eur", "5");
  await openTab(page);
  await limitInput(page, "GPT-4o").fill("6");
  await limitInput(page, "GPT-4o").fill("5,00");
  await limitInput(page, "GPT-5 Mini").fill("3");
  await limitInput(page, "GPT-5 Mini").fill("");
  await enabledSwitch(page, "GPT-5 Mini").check();
  await enabledSwitch(page, "GPT-5 Mini").uncheck();
  const fallback = page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" });
  await fallback.click();
  await fallback.click();
  const asked = answerDialogs(page, "dismiss");
  await page.getByRole("link", { name: "Home" }).click();
  await expect(page).toHaveURL(/\/$/);
  expect(asked).toEqual([]);
  cli("limit", "clear", "gpt-4o");
});

test("a user whose email has an accent signs in through the form", async ({ page }) => {
  execFileSync(bin, ["--database-url", dbUrl(), "user", "create", "--email", "Zoë@Example.com", "--role", "admin"], {
    env: { ...process.env, TOLLGATE_PASSWORD: PASSWORD },
  });
  await signIn(page, "zoë@example.com");
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(page.getByRole("heading", { name: "Model limits" })).toBeVisible();
  // Back to the sign-in page, signed in: led on to the tab, not shown the form.
  await page.goBack();
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(page.getByRole("heading", { name: "Model limits" })).toBeVisible();
});

test("a limit's note speaks of the limit as saved, and steps aside while it is changed", async ({ page }) => {
  cli("limit", "set", "claude-haiku-4-5", "--eur", "0");
  await openTab(page);
  const note = page.locator('[id="limit-note-claude-haiku-4-5"]');
  const field = limitInput(page, "Claude Haiku 4.5");
  await expect(note).toContainText("lets no request through");
  await expect(field).toHaveAttribute("aria-describedby", /limit-note-claude-haiku-4-5/);
  await field.fill("5");
  await expect(note).toBeHidden();
  await expect(field).not.toHaveAttribute("aria-describedby", /limit-note/);
  cli("limit", "clear", "claude-haiku-4-5");
});

test("the tab fits a phone's screen", async ({ page }) => {
  await page.setViewportSize({ width: 360, height: 740 });
  await openTab(page);
  // Nothing scrolls sideways, and a limit field is wide enough to read an amount.
  const [scrollWidth, innerWidth] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  expect(scrollWidth).toBeLessThanOrEqual(innerWidth);
  const field = await limitInput(page, "Claude Sonnet 4.5").boundingBox();
  expect(field!.width).toBeGreaterThanOrEqual(150);
  // The table's head is hidden here, so each switch says what it is beside it,
  // and keeps its own name for assistive technology.
  const row = page.locator('tr[data-model="claude-sonnet-4-5"]');
  await expect(row.getByText("Enabled", { exact: true })).toBeVisible();
  await expect(enabledSwitch(page, "Claude Sonnet 4.5")).toBeVisible();
  await page.setViewportSize({ width: 1280, height: 800 });
  await expect(row.getByText("Enabled", { exact: true })).toBeHidden();
  await page.setViewportSize({ width: 360, height: 740 });
  await expect(page.getByRole("button", { name: "Sign out" })).toBeVisible();
});

test("an error forged into the tab's URL shows only the tab's own sentences", async ({ page }) => {
  await openTab(page);
  // A refused save answered without JavaScript, as the server redirects it.
  const refused = await page.request.post("/fn/save_model_limits", {
    form: { "rows[0][model]": "gpt-4o", "rows[0][limit]": "abc", "rows[0][version]": "0" },
    headers: { Accept: "text/html", Referer: page.url(), Origin: new URL(page.url()).origin },
    maxRedirects: 0,
  });
  expect([302, 303]).toContain(refused.status());
  const location = new URL(refused.headers()["location"], page.url()).toString();
  for (const [forge, section, row] of [
    [phishing, "#limits-result", '[id="limit-error-gpt-4o"]'],
    [(e: any) => ({ code: "conflict", message: PHISH }), "#limits-result", null],
    [(e: any) => ({ code: "bad_request", message: PHISH }), "#limits-result", null],
  ] as const) {
    await page.goto(forgedErrorUrl(location, forge));
    await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
    await expect(page.locator(section)).not.toBeEmpty();
    if (row) await expect(page.locator(row)).toContainText("using digits");
    await expect(page.locator("body")).not.toContainText("evil.example");
  }
  const fallback = new URL(location);
  fallback.searchParams.set("__path", fallback.searchParams.get("__path")!.replace("save_model_limits", "save_automatic_fallback"));
  await page.goto(forgedErrorUrl(fallback.toString(), (e: any) => ({ code: "conflict", message: PHISH })));
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await expect(page.locator("#fallback-result")).toContainText("these settings were changed since this page showed them");
  await expect(page.locator("body")).not.toContainText("evil.example");
});

/** Switches shown after Back must be the saved ones: the browser restores a
 * page's form controls on Back, as the administrator left them, while the
 * page's versions are current, so a save would send the old state unrefused. */
async function backShowsSavedSwitches(page: Page, open: () => Promise<void>) {
  cli("fallback", "off");
  cli("limit", "set", "gpt-5-mini", "--eur", "5", "--disabled");
  await open();
  const fallback = page.getByRole("switch", { name: "Automatically switch to a cheaper model when a model limit is reached" });
  await expect(fallback).not.toBeChecked();
  await expect(enabledSwitch(page, "GPT-5 Mini")).not.toBeChecked();
  // Changed meanwhile, as by another administrator.
  cli("fallback", "on");
  cli("limit", "set", "gpt-5-mini", "--eur", "5");
  await page.getByRole("link", { name: "Home" }).click();
  await expect(page).toHaveURL(/\/$/);
  await page.goBack();
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(fallback).toBeChecked();
  await expect(enabledSwitch(page, "GPT-5 Mini")).toBeChecked();
  // A save sends the settings as shown: nothing is switched off unseen.
  await page.getByRole("button", { name: "Save automatic fallback" }).click();
  await expect(page.locator("#fallback-result")).toHaveText("Saved.");
  await expect(fallback).toBeChecked();
  await page.getByRole("button", { name: "Save model limits" }).click();
  await expect(page.locator("#limits-result")).toHaveText("Saved.");
  await expect(enabledSwitch(page, "GPT-5 Mini")).toBeChecked();
  cli("limit", "clear", "gpt-5-mini");
}

test("after Back, the switches show the saved settings", async ({ page }) => {
  await backShowsSavedSwitches(page, async () => {
    await openTab(page);
  });
});

test("after signing out, Back shows the page signed out, with no Sign out", async ({ page }) => {
  // A session of its own: signing out ends it, and the other tests share theirs.
  await signIn(page, "admin@example.com");
  await expect(page).toHaveURL(/\/admin\/token-limits$/);
  await expect(page.locator("#app[data-hydrated=true]")).toBeVisible();
  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page).toHaveURL(/\/login/);
  await page.goBack();
  await expect(page.getByText("to see the token limits")).toBeVisible();
  const sidebar = page.getByRole("navigation", { name: "Main" });
  await expect(sidebar.getByRole("button", { name: "Sign out" })).toHaveCount(0);
  await expect(sidebar).not.toContainText("admin@example.com");
  await expect(sidebar.getByRole("link", { name: "Sign in" })).toBeVisible();
});

test("a save once signed out elsewhere says so and leads to sign in", async ({ page }) => {
  await openTab(page);
  // Signed out meanwhile, as by another tab: the browser no longer has the cookie.
  await page.context().clearCookies();
  await limitInput(page, "GPT-4o").fill("44");
  await page.getByRole("button", { name: "Save model limits" }).click();
  const result = page.locator("#limits-result");
  await expect(result).toContainText("You are signed out, so nothing was saved.");
  // Signing in leaves the page, and the change typed with it: asked first.
  const asked = answerDialogs(page, "accept");
  await result.getByRole("link", { name: "Sign in again" }).click();
  await expect(page).toHaveURL(/\/login\?next=%2Fadmin%2Ftoken-limits$/);
  expect(asked).toEqual([LEAVE_QUESTION]);
  expect(cli("audit", "--limit", "1")).not.toContain('"limit_eur":"44"');
});

test("a member sees no Admin link and is refused the tab", async ({ page }) => {
  await signIn(page, "member@example.com");
  // Signed in, the member lands on the start page rather than on the tab's
  // refusal, and sees no way to the Admin Panel.
  await expect(page).toHaveURL(/\/$/);
  await expect(page.getByRole("heading", { name: "Tollgate" })).toBeVisible();
  await expect(page.getByRole("link", { name: "Admin" })).toHaveCount(0);
  // The tab's address itself is refused, with no figure of the workspace.
  const response = await page.goto("/admin/token-limits");
  expect(response?.status()).toBe(403);
  await expect(page.getByRole("heading", { name: "No access" })).toBeVisible();
  await expect(page.locator("body")).not.toContainText("€");
  await page.getByRole("link", { name: "Go to the start page" }).click();
  await expect(page.getByRole("heading", { name: "Tollgate" })).toBeVisible();
  // Back to the login page, signed in: led on, not shown the form again.
  await page.goto("/login?next=%2Fadmin%2Ftoken-limits");
  await expect(page).toHaveURL(/\/$/);
});

test.describe("without JavaScript", () => {
  test.use({ javaScriptEnabled: false });

  /** The tab, without JavaScript: the shared session, or a sign-in by the form. */
  async function openTabWithoutScript(page: Page) {
    if (adminSession) {
      await page.context().addCookies(adminSession);
    } else {
      await page.goto("/login?next=%2Fadmin%2Ftoken-limits");
      await page.getByLabel("Email").fill("admin@example.com");
      await page.getByLabel("Password").fill(PASSWORD);
      await page.getByRole("button", { name: "Sign in" }).click();
    }
    await page.goto("/admin/token-limits");
  }

  test("after Back, the switches show the saved settings", async ({ page }) => {
    await backShowsSavedSwitches(page, () => openTabWithoutScript(page));
  });

  test("a wrong password, a refused save and a saved one come back to the page with their messages", async ({ page }) => {
    await page.goto("/login?next=%2Fadmin%2Ftoken-limits");
    await page.getByLabel("Email").fill("admin@example.com");
    await page.getByLabel("Password").fill("not the password");
    await page.getByRole("button", { name: "Sign in" }).click();
    await expect(page.locator("#login-error")).toHaveText("The email or password is not correct.");
    await page.getByLabel("Email").fill("admin@example.com");
    await page.getByLabel("Password").fill(PASSWORD);
    await page.getByRole("button", { name: "Sign in" }).click();
    await expect(page).toHaveURL(/\/admin\/token-limits$/);
    const auditBefore = cli("audit");
    await limitInput(page, "GPT-4o").fill("abc");
    await limitInput(page, "GPT-5 Mini").fill("7");
    await page.locator("#save-limits").click();
    await expect(page.locator("#limits-result")).toContainText("Nothing was saved");
    await expect(page.locator('[id="limit-error-gpt-4o"]')).toContainText("using digits");
    // What was typed comes back, in every row, with the focus on the field to correct.
    await expect(limitInput(page, "GPT-4o")).toHaveValue("abc");
    await expect(limitInput(page, "GPT-5 Mini")).toHaveValue("7");
    await expect(limitInput(page, "GPT-4o")).toBeFocused();
    expect(cli("audit")).toBe(auditBefore);

    // The answer rides in the URL, where anyone can write any text: the page shows
    // its codes' own sentences, never the URL's.
    await page.goto(forgedErrorUrl(page.url(), phishing));
    await expect(page.locator("#limits-result")).toContainText("Nothing was saved");
    await expect(page.locator('[id="limit-error-gpt-4o"]')).toContainText("using digits");
    await expect(page.locator("body")).not.toContainText("evil.example");

    // Corrected and saved: the page says so, as it does with JavaScript.
    await limitInput(page, "GPT-4o").fill("44");
    await page.locator("#save-limits").click();
    await expect(page.locator("#limits-result")).toHaveText("Saved.");
    await expect(limitInput(page, "GPT-4o")).toHaveValue("€44.00");
    await expect(page.locator("#fallback-result")).toHaveText("");
    // A reload saves nothing, so it says nothing.
    await page.reload();
    await expect(limitInput(page, "GPT-4o")).toHaveValue("€44.00");
    await expect(page.locator("#limits-result")).toHaveText("");
    cli("limit", "clear", "gpt-4o");
  });

  test("a conflict keeps what was typed and leads to the current values, not to the same answer again", async ({ page }) => {
    await openTabWithoutScript(page);
    await limitInput(page, "GPT-4o").fill("21");
    await limitInput(page, "GPT-5").fill("36");
    cli("limit", "set", "gpt-4o", "--eur", "8");
    await page.locator("#save-limits").click();
    const result = page.locator("#limits-result");
    await expect(result).toContainText("these settings were changed since this page showed them");
    // As with JavaScript: what was typed, on the versions it was typed on.
    await expect(limitInput(page, "GPT-4o")).toHaveValue("21");
    await expect(limitInput(page, "GPT-5")).toHaveValue("36");
    await page.locator("#save-limits").click();
    await expect(result).toContainText("these settings were changed since this page showed them");
    await result.getByRole("link", { name: "Load the current values" }).click();
    await expect(page).toHaveURL(/\/admin\/token-limits$/);
    await expect(result).toHaveText("");
    await expect(limitInput(page, "GPT-4o")).toHaveValue("€8.00");
    cli("limit", "clear", "gpt-4o");
  });

  test("a save once signed out elsewhere goes to sign in, which says it was not saved", async ({ page }) => {
    await openTabWithoutScript(page);
    await page.context().clearCookies();
    await limitInput(page, "GPT-4o").fill("45");
    await page.locator("#save-limits").click();
    await expect(page).toHaveURL(/\/login\?next=%2Fadmin%2Ftoken-limits&reason=signed_out$/);
    await expect(page.locator("#signed-out")).toContainText("your change was not saved");
    await page.getByLabel("Email").fill("admin@example.com");
    await page.getByLabel("Password").fill(PASSWORD);
    await page.getByRole("button", { name: "Sign in" }).click();
    await expect(page).toHaveURL(/\/admin\/token-limits$/);
    await expect(limitInput(page, "GPT-4o")).toHaveValue("");
  });
});

import { test, expect } from "@playwright/test";

test("the page is rendered on the server, hydrates, and reaches the database", async ({ page }) => {
  const response = await page.goto("/");
  expect(response?.status()).toBe(200);
  // Server-rendered before any script runs.
  await expect(page.getByRole("heading", { name: "Tollgate" })).toBeVisible();
  // Set by an effect, which only runs once the wasm has hydrated the page.
  await expect(page.locator("main[data-hydrated=true]")).toBeVisible();
  await page.getByRole("button", { name: "Check database" }).click();
  await expect(page.locator("#workspace-answer")).toHaveText("Workspace: Demo workspace");
});

import { execFileSync } from "node:child_process";
import { resolve } from "node:path";

// Demo accounts and usage, through the operator's CLI, on the database the
// server of this run uses (the CLI is safe to run while `serve` runs).
export default function globalSetup() {
  const bin = process.env.TOLLGATE_BIN ?? resolve("..", "target", "release", "tollgate");
  const url = `sqlite://${process.env.TOLLGATE_E2E_DIR}/tollgate.db`;
  execFileSync(bin, ["--database-url", url, "demo"], {
    env: { ...process.env, TOLLGATE_PASSWORD: PASSWORD },
    stdio: "inherit",
  });
}

export const PASSWORD = "end-to-end password";

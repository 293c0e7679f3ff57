// Helpers shared by the Playwright config, the tests and the screenshot script.
import { createServer } from "node:net";

/** A TCP port free on 127.0.0.1 right now. @returns {Promise<number>} */
export function freePort() {
  return new Promise((done, fail) => {
    const srv = createServer();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const address = srv.address();
      srv.close(() => (typeof address === "object" && address ? done(address.port) : fail(new Error("no port"))));
    });
  });
}

/** Waits until `${base}/healthz` answers 200, for at most 10 s. @param {string} base */
export async function waitUntilHealthy(base) {
  for (let i = 0; ; i++) {
    try {
      if ((await fetch(`${base}/healthz`)).ok) return;
    } catch {}
    if (i > 100) throw new Error(`the server at ${base} did not start`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

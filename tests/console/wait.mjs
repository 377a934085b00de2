// What both browser tests need: a free loopback port, and a bounded wait for a condition.

import { createServer } from "node:net";

export const freePort = () => new Promise((ok, fail) => {
  const s = createServer().listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => ok(port)); }).on("error", fail);
});

/** Waits (at most `ms`) until `check` returns a truthy value, and returns it. */
export async function until(what, check, ms) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try { last = await check(); if (last) return last; } catch (e) { last = e; }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${last}`);
    await new Promise(r => setTimeout(r, 100));
  }
}

// The console in a real browser: headless Chromium (Debian's), driven by playwright-core,
// against a real `spiced dev` with bearer tokens. Run by scripts/console-test.sh, which
// installs both (and the sqlite3 shell); screenshots of every page go to
// target/console-screenshots/.
//
// The dead letter is made the way an operator's database could make one: a trigger (added
// with the sqlite3 shell to dev's database) refuses the worker's heartbeat, a registry
// update, for one aggregate, so its command is dead-lettered at its first attempt. A worker
// confirms its lease with a heartbeat before the effect only when the last confirmation is
// older than worker.heartbeat_ms (20 ms here), so a second trigger makes that command's claim
// slow (a scan of two million rows). Dropping the triggers is the fix; the re-drive from the
// page then completes the command.
//
// Environment: SPICED_BIN (the spiced binary), CHROMIUM (the browser), SCREENSHOTS (a dir).

import { chromium } from "playwright-core";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync, rmSync } from "node:fs";
import { freePort, until as waitUntil } from "./wait.mjs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";

const BIN = process.env.SPICED_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOTS;
const WAIT_MS = 20_000;
const TOKENS = { read: "console-read-token-0123456789", write: "console-write-token-0123456789", admin: "console-admin-token-0123456789" };

const until = (what, check) => waitUntil(what, check, WAIT_MS);

const dir = mkdtempSync(join(tmpdir(), "spiced-console-"));
writeFileSync(join(dir, "tokens"), Object.entries(TOKENS).map(([scope, t]) => `${scope}-user ${scope} ${t}`).join("\n") + "\n", { mode: 0o600 });
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const dev = spawn(BIN, ["dev"], {
  cwd: dir,
  // spiced refuses SPICED_* variables that are not config overrides: pass none of this
  // script's own.
  env: { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SPICED_"))), SPICED_SERVE__LISTEN: `127.0.0.1:${port}`, SPICED_AUTH__TOKEN_FILE: join(dir, "tokens"), SPICED_LOG: "warn", SPICED_WORKER__HEARTBEAT_MS: "20" },
  stdio: ["ignore", "inherit", "inherit"],
});
let running = true;
const exited = new Promise(ok => dev.on("exit", (code, signal) => { running = false; ok({ code, signal }); }));
let browser;

async function api(method, path, token, body) {
  const r = await fetch(base + "/api/v1" + path, {
    method,
    headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function command(path, body) {
  const r = await api("POST", path, TOKENS.write, body);
  assert.equal(r.status, 202, JSON.stringify(r.body));
  return r.body.command_id;
}

async function outcome(id) {
  return until(`command ${id} to finish`, async () => {
    const r = await api("GET", `/commands/${id}`, TOKENS.read);
    return ["COMPLETED", "FAILED"].includes(r.body.status) && r.body;
  });
}

async function shot(page, name) {
  if (SHOTS) await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

async function load(page, hash) {
  await page.goto(`${base}/console${hash}`);
  await page.waitForFunction(h => document.getElementById("main").dataset.loaded && location.hash === h, hash);
}

try {
  await until("spiced dev to be ready", async () => {
    if (!running) throw new Error("spiced dev exited");
    return (await fetch(base + "/readyz")).ok;
  });
  await outcome(await command("/databases", { name: "shop" }));
  await outcome(await command("/databases/shop/classes", {
    id: "Product", properties: [{ name: "name", type: "string" }, { name: "price", type: "number" }],
  }));
  const created = [];
  for (const [id, price] of [["p-1", 5], ["p-2", 12], ["p-3", 30]]) {
    created.push(await command("/databases/shop/classes/Product/instances", { id, data: { name: `shoe ${id}`, price } }));
  }
  // A hostile string: shown as text, never run.
  created.push(await command("/databases/shop/classes/Product/instances", { id: "evil", data: { name: "<img src=x onerror=window.pwned=1>", price: 1 } }));
  const failed = await command("/databases/shop/classes/Product/instances", { id: "p-bad", data: { price: "cheap" } });
  for (const id of created) assert.equal((await outcome(id)).status, "COMPLETED");
  assert.equal((await outcome(failed)).status, "FAILED");

  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const dialogs = [];
  page.on("dialog", d => { dialogs.push(d.message()); d.dismiss(); });
  const errors = [];
  page.on("pageerror", e => errors.push(String(e)));
  // The browser logs each refused call ("Failed to load resource"); the refusals are checked
  // on the page instead.
  page.on("console", m => { if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(m.text()); });

  // No token: the page loads, and says the API wants one.
  await load(page, "#pipeline");
  assert.match(await page.locator("#main .banner").innerText(), /needs a bearer token/);
  await shot(page, "0-no-token");

  // A read token, kept in session storage and never in the URL.
  await page.fill("#token", TOKENS.read);
  await page.click("#auth button[type=submit]");
  await page.waitForSelector("#clocks");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("spiced.token")), TOKENS.read);
  assert.ok(!page.url().includes(TOKENS.read));

  // Pipeline: the clocks show the real positions, as GET /status gives them.
  const status = (await api("GET", "/status", TOKENS.read)).body;
  assert.ok(status.log_head >= 12, JSON.stringify(status));
  const cell = (clock, col) => page.locator(`#clocks tr[data-clock=${clock}] td`).nth(col).innerText();
  await until("the pipeline page to show the log head", async () => Number(await cell("log", 1)) === status.log_head);
  await until("the read models to show the head", async () => Number(await cell("projection", 1)) >= status.log_head && await cell("projection", 2) === "0");
  assert.equal(Number(await cell("workers", 1)), status.embedded_workers.position);
  // The chart keeps a sample per refresh: a line of several points (flat at 0 when nothing
  // is behind, which the browser does not count as visible).
  await until("the chart to draw a line", async () =>
    ((await page.locator(".chart polyline").first().getAttribute("points")) || "").split(" ").length >= 2);
  // It refreshes itself: a new command moves the log head on the page.
  await outcome(await command("/databases", { name: "more" }));
  const moved = (await api("GET", "/status", TOKENS.read)).body.log_head;
  assert.ok(moved > status.log_head);
  await until("the pipeline page to refresh", async () => Number(await cell("log", 1)) === moved);
  await shot(page, "1-pipeline");

  // Commands: a failed one with its reason, a completed one with its envelope and history.
  await load(page, `#commands/${failed}`);
  assert.equal(await page.locator("#command-status").innerText(), "FAILED");
  assert.match(await page.locator("#command").innerText(), /invalid_instance/);
  await load(page, `#commands/${created[0]}`);
  assert.equal(await page.locator("#command-status").innerText(), "COMPLETED");
  assert.match(await page.locator("#envelope").innerText(), new RegExp(created[0]));
  assert.equal(await page.locator("#around-outcomes tr[data-seq]").count(), 1);
  await shot(page, "2-commands");
  await load(page, "#commands/not-a-uuid");
  assert.match(await page.locator("#command .banner").innerText(), /400/);

  // Aggregates: commands and outcomes side by side, from the log.
  await load(page, `#aggregates/Instance/${encodeURIComponent("shop:main:Product:p-2")}`);
  assert.equal(await page.locator("#aggregate-commands tr[data-seq]").count(), 1);
  assert.match(await page.locator("#aggregate-outcomes").innerText(), /INSTANCE_CREATED|"price": 12/);
  await shot(page, "3-aggregates");

  // Log: the last positions, then new ones as they are written (long polls), and a filter.
  await load(page, "#log");
  await until("the log page to list positions", async () => await page.locator("#log-rows tr").count() > 0);
  await outcome(await command("/databases", { name: "live" }));
  await until("the log page to follow the log", async () => /\blive\b/.test(await page.locator("#log-rows").innerText()));
  await page.fill("#log-aggregate", "live");
  await page.click("#log-filter");
  await until("the filter to show the command and its outcome only", async () => {
    const aggregates = await page.locator("#log-rows tr td:nth-child(4)").allInnerTexts();
    return aggregates.length === 2 && aggregates.every(a => a === "live");
  });
  await shot(page, "4-log");

  // Read models: databases, classes, instances with the query API's filter and paging.
  await load(page, "#models/shop/Product");
  await page.waitForSelector("#instances table");
  assert.match(await page.locator("#databases").innerText(), /shop/);
  assert.match(await page.locator("#classes").innerText(), /Product/);
  assert.match(await page.locator("#instances").innerText(), /^4 matching/);
  // The hostile string is on the page as text and ran nothing.
  assert.match(await page.locator("#instances").innerText(), /<img src=x onerror=window.pwned=1>/);
  assert.equal(await page.evaluate(() => window.pwned), undefined);
  await page.fill("#where", "price>10");
  await page.click("#filter");
  await until("the filter to apply", async () => /^2 matching/.test(await page.locator("#instances").innerText()));
  await shot(page, "5-read-models");
  await page.fill("#where", "price>>");
  await page.click("#filter");
  await until("a bad filter to be refused", async () => /invalid_filter/.test(await page.locator("#instances").innerText()));

  // Dead letters: a command the database refuses is listed; read scope cannot re-drive it;
  // after the fix, admin scope re-drives it (to the embedded workers) and it completes.
  const sqlite = sql => execFileSync("sqlite3", ["-bail", "-cmd", ".timeout 10000", join(dir, "data", "spiced.db"), sql], { stdio: ["ignore", "ignore", "inherit"] });
  sqlite(`CREATE TABLE slow AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) SELECT x FROM c;
          CREATE TRIGGER slow_stuck AFTER INSERT ON processed_events WHEN NEW.aggregate_id = 'stuck'
          BEGIN SELECT count(*) FROM slow WHERE x % 7 = 3; END;
          CREATE TRIGGER refuse_stuck BEFORE UPDATE OF heartbeat_at ON processed_events
          WHEN NEW.aggregate_id = 'stuck' AND OLD.status = 'processing' AND NEW.status = 'processing'
          BEGIN SELECT RAISE(ABORT, 'refused by the operator trigger'); END`);
  const stuck = await command("/databases", { name: "stuck" });
  const letter = await outcome(stuck);
  assert.equal(letter.status, "FAILED", JSON.stringify(letter));
  assert.match(JSON.stringify(letter.error), /refused by the operator trigger/);
  await load(page, "#dead-letters/ontology");
  const row = page.locator(`#dead-letters tr[data-event="${stuck}"]`);
  assert.equal(await row.count(), 1, "the dead letter is listed");
  assert.match(await row.innerText(), /refused by the operator trigger/);
  await page.click(`#dead-letters a[href$="${stuck}"]`);
  await until("the dead letter to be shown", async () => /CREATE_DATABASE_REQUESTED/.test(await page.locator("#dead-letter-envelope").innerText()));
  page.removeAllListeners("dialog");
  const confirms = [];
  page.on("dialog", d => { confirms.push(d.message()); d.accept(); });
  await page.click("#redrive");
  await until("the refusal to read scope", async () => /admin/.test(await page.locator("#redrive-outcome").innerText()));
  assert.equal((await api("GET", `/commands/${stuck}`, TOKENS.read)).body.status, "FAILED", "a refused re-drive changes nothing");
  await shot(page, "6-dead-letters");
  sqlite("DROP TRIGGER refuse_stuck; DROP TRIGGER slow_stuck; DROP TABLE slow");
  await page.fill("#token", TOKENS.admin);
  await page.click("#auth button[type=submit]");
  await page.waitForSelector("#redrive");
  await page.click("#redrive");
  await until("the re-drive", async () => /Re-driven to the embedded workers/.test(await page.locator("#redrive-outcome").innerText()));
  assert.equal(confirms.length, 2, "each re-drive asked first: " + confirms);
  assert.equal((await outcome(stuck)).status, "COMPLETED");
  await load(page, "#dead-letters/ontology");
  assert.equal(await page.locator("#dead-letters-empty").count(), 1, "the list lost it");

  // A token that is not one is refused, and the page says so.
  await page.fill("#token", "not-a-token-of-this-deployment");
  await page.click("#auth button[type=submit]");
  await until("the refusal", async () => /needs a bearer token/.test(await page.locator("#main").innerText()));

  assert.deepEqual(dialogs, [], "no script ran from the data");
  assert.deepEqual(errors, [], "the page logged no errors");
  console.log(`console: ${SHOTS ? "screenshots in " + SHOTS + "; " : ""}every page checked in Chromium`);
} finally {
  if (browser) await browser.close();
  if (running) dev.kill("SIGTERM");
  const { code } = await exited;
  rmSync(dir, { recursive: true, force: true });
  if (code !== 0) { console.error(`spiced dev exited with ${code}`); process.exitCode = 1; }
}

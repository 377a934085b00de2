// The console's dead-letter page in a real browser, on the production pipeline: `spiced
// serve`, `spiced relay` and `spiced worker` as processes on the test services (PostgreSQL,
// the S3 server, the broker). A command is dead-lettered (its sequence 2 is published before
// sequence 1 has an outcome, with one attempt allowed), then the page lists it, a read token
// is refused the re-drive, and an admin token re-drives it after confirming: it leaves the
// list and completes. Run by scripts/console-test.sh (which scripts/test.sh calls with the
// services' environment: SPICED_TEST_PG_URL, SPICED_TEST_S3_*, SPICED_TEST_KAFKA_BROKERS).

import { chromium } from "playwright-core";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { freePort, until as waitUntil } from "./wait.mjs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import assert from "node:assert/strict";

const BIN = process.env.SPICED_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOTS;
const WAIT_MS = 30_000;
const TOKENS = { read: "redrive-read-token-0123456789", admin: "redrive-admin-token-0123456789" };
for (const v of ["SPICED_TEST_PG_URL", "SPICED_TEST_S3_ENDPOINT", "SPICED_TEST_S3_BUCKET", "SPICED_TEST_KAFKA_BROKERS"]) {
  if (!process.env[v]) throw new Error(`${v} is not set: run through scripts/test.sh (or source target/services/env)`);
}

const until = (what, check) => waitUntil(what, check, WAIT_MS);

// Storage nobody else uses: a database named like the Rust tests' (the test script drops
// those), a log prefix, topics and consumer groups of their own.
const tag = randomUUID().replaceAll("-", "");
const dbName = `spiced_test_console_${tag}`;
const psql = sql => execFileSync("psql", [process.env.SPICED_TEST_PG_URL, "-v", "ON_ERROR_STOP=1", "-qc", sql], { stdio: ["ignore", "ignore", "inherit"] });
psql(`CREATE DATABASE ${dbName}`);
const dbUrl = new URL(process.env.SPICED_TEST_PG_URL);
dbUrl.pathname = "/" + dbName;

const dir = mkdtempSync(join(tmpdir(), "spiced-redrive-"));
writeFileSync(join(dir, "tokens"), `reader read ${TOKENS.read}\noperator admin ${TOKENS.admin}\n`, { mode: 0o600 });
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const t = `c${tag}`;
writeFileSync(join(dir, "spiced.toml"), `
[log]
url = "s3://${process.env.SPICED_TEST_S3_BUCKET}/console-${tag}"
[log.s3]
endpoint = "${process.env.SPICED_TEST_S3_ENDPOINT}"
allow_http = true
path_style = true
[database]
url = "${dbUrl}"
[serve]
listen = "127.0.0.1:${port}"
[auth]
token_file = "${join(dir, "tokens")}"
[topics]
ontology_commands = "${t}_ontology_commands"
instance_commands = "${t}_instance_commands"
ontology_events = "${t}_ontology_events"
instance_events = "${t}_instance_events"
[kafka]
brokers = "${process.env.SPICED_TEST_KAFKA_BROKERS}"
# A re-drive makes a new producer whose first delivery also fetches the topic's metadata:
# 1 s was seen to run out on a loaded machine (a 503, the row left claimable). The relay's
# lease must be above twice this; one relay runs here, so its length costs nothing.
message_timeout_ms = 10000
[relay]
poll_interval_ms = 50
lease_ms = 25000
dead_letter_topic = "${t}_relay_dead_letters"
[worker]
group_prefix = "${t}"
max_attempts = 1
gap_wait_ms = 300
session_timeout_ms = 6000
ontology_dead_letter_topic = "${t}_ontology_dead_letters"
instance_dead_letter_topic = "${t}_instance_dead_letters"
[metrics]
relay_listen = ""
worker_listen = ""
project_listen = ""
`);

const env = { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SPICED_"))), SPICED_LOG: "warn" };
const processes = [];
function run(...args) {
  const child = spawn(BIN, [...args, "--config", join(dir, "spiced.toml")], { cwd: dir, env, stdio: ["ignore", "inherit", "inherit"] });
  const exited = new Promise(ok => child.on("exit", code => ok(code)));
  processes.push({ child, exited, args });
  return exited;
}
let browser;

async function api(method, path, token) {
  const r = await fetch(base + "/api/v1" + path, {
    method, headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: method === "GET" ? undefined : "{}",
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function status(id) {
  return (await api("GET", `/commands/${id}`, TOKENS.read)).body;
}

try {
  assert.equal(await run("migrate"), 0, "spiced migrate");
  run("serve");
  await until("spiced serve to be ready", async () => (await fetch(base + "/readyz")).ok);
  // No relay yet: the create (sequence 1) and the delete (sequence 2) are only in the log.
  const db = "r" + tag.slice(0, 8);
  const create = await fetch(`${base}/api/v1/databases`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${TOKENS.admin}` }, body: JSON.stringify({ name: db }) });
  assert.equal(create.status, 202);
  const createId = (await create.json()).command_id;
  const del = await api("DELETE", `/databases/${db}?expected_seq=1`, TOKENS.admin);
  assert.equal(del.status, 202, JSON.stringify(del.body));
  const deleteId = del.body.command_id;
  // Publish the delete alone: its worker waits for sequence 1's outcome, gives up, and
  // dead-letters it (one attempt).
  const log = (await api("GET", "/log?from_position=1", TOKENS.read)).body;
  const at = log.events.find(e => e.envelope.event_id === deleteId).position;
  assert.equal(await run("relay", "--republish", "--from-position", String(at), "--to-position", String(at)), 0, "relay re-publish");
  // The one-shot relay made the topics; the worker's new group reads from the earliest offset.
  run("worker");
  await until("the delete to fail", async () => (await status(deleteId)).status === "FAILED");
  // The relay proper: the create completes, the delete is delivered again and stays failed.
  run("relay");
  await until("the create to complete", async () => (await status(createId)).status === "COMPLETED");

  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
  const confirms = [];
  page.on("dialog", d => { confirms.push(d.message()); d.accept(); });
  await page.goto(`${base}/console#dead-letters/ontology`);
  await page.fill("#token", TOKENS.read);
  await page.click("#auth button[type=submit]");
  const row = page.locator(`#dead-letters tr[data-event="${deleteId}"]`);
  await until("the dead letter to be listed", async () => await row.count() === 1);
  assert.match(await row.innerText(), /out of order/);
  assert.doesNotMatch(await page.locator("#main").innerText(), /^(null|undefined)$/m, "no stray value rendered as text");
  await page.click(`#dead-letters a[href$="${deleteId}"]`);
  await until("the dead letter to be shown", async () => /DELETE_DATABASE_REQUESTED/.test(await page.locator("#dead-letter-envelope").innerText()));

  // Read scope sees it but cannot re-drive it.
  await page.click("#redrive");
  await until("the refusal", async () => /admin/.test(await page.locator("#redrive-outcome").innerText()));
  assert.equal((await status(deleteId)).status, "FAILED", "a refused re-drive changes nothing");
  if (SHOTS) await page.screenshot({ path: join(SHOTS, "7-dead-letters-production.png"), fullPage: true });

  // Admin scope re-drives it, after confirming; it leaves the list and completes.
  await page.fill("#token", TOKENS.admin);
  await page.click("#auth button[type=submit]");
  await page.waitForSelector("#redrive");
  await page.click("#redrive");
  await until("the re-drive", async () => /Re-driven to/.test(await page.locator("#redrive-outcome").innerText()));
  assert.equal(confirms.length, 2, "each re-drive asked first: " + confirms);
  await until("the command to complete", async () => (await status(deleteId)).status === "COMPLETED");
  await until("the list to lose it", async () => (await page.locator("#dead-letters-empty").count()) === 1);
  console.log("console: dead letter listed, refused to read scope, re-driven with admin scope, completed");
} finally {
  if (browser) await browser.close();
  for (const p of processes) if (p.child.exitCode === null) p.child.kill("SIGTERM");
  const codes = await Promise.all(processes.map(p => p.exited));
  rmSync(dir, { recursive: true, force: true });
  try { psql(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`); } catch (e) { console.error("could not drop " + dbName + ": " + e); }
  const bad = processes.map((p, i) => [p.args.join(" "), codes[i]]).filter(([, c]) => c !== 0);
  if (bad.length) { console.error("processes that did not exit 0: " + JSON.stringify(bad)); process.exitCode = 1; }
}

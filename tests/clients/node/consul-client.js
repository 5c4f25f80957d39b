// Drives the npm `consul` client (pinned in package.json) against a Consul-compatible server at
// $CONSUL_ADDR (host:port). Prints "ok <step>" per step and exits non-zero at the first failure.
// Run by tests/it/consul_clients.rs against `skyline registry`.
"use strict";

const assert = require("node:assert/strict");
const Consul = require("consul");

const [host, port] = (process.env.CONSUL_ADDR || "127.0.0.1:8500").split(":");
const consul = new Consul({ host, port: Number(port) });

// A refused write answers `false`; the library resolves a JSON `false` body as undefined.
function ok(step) {
  console.log(`ok ${step}`);
}

/** Resolves with the watch's next change, or rejects after `ms`. */
function nextChange(watch, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no change within ${ms} ms`)), ms);
    watch.once("change", (data, res) => {
      clearTimeout(timer);
      resolve({ data, res });
    });
    watch.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

async function main() {
  // Agent services with a TTL check.
  await consul.agent.service.register({
    name: "web",
    id: "web-1",
    port: 8080,
    tags: ["v1"],
    check: { ttl: "30s" },
  });
  const services = await consul.agent.service.list();
  assert.equal(services["web-1"].Service, "web");
  ok("agent service register");

  await consul.agent.check.pass({ id: "service:web-1", note: "fine" });
  let passing = await consul.health.service({ service: "web", passing: true });
  assert.equal(passing.length, 1);
  assert.equal(passing[0].Service.ID, "web-1");
  ok("ttl pass");

  await consul.agent.check.fail({ id: "service:web-1", note: "broken" });
  const checks = await consul.health.checks("web");
  assert.equal(checks.find((c) => c.CheckID === "service:web-1").Status, "critical");
  passing = await consul.health.service({ service: "web", passing: true });
  assert.equal(passing.length, 0);
  ok("ttl fail");

  await consul.agent.check.pass({ id: "service:web-1" });
  passing = await consul.health.service({ service: "web", passing: true });
  assert.equal(passing.length, 1);
  ok("health passing");

  // A blocking query through the library's watch: it blocks on the index, wakes on a write.
  await consul.kv.set("blocking/key", "one");
  const watch = consul.watch({
    method: consul.kv.get,
    options: { key: "blocking/key", wait: "10s" },
    backoffFactor: 100,
  });
  try {
    const first = await nextChange(watch, 5000);
    assert.equal(first.data.Value, "one");
    const firstIndex = BigInt(first.res.headers["x-consul-index"]);
    const later = nextChange(watch, 8000);
    await new Promise((r) => setTimeout(r, 300));
    await consul.kv.set("blocking/key", "two");
    const second = await later;
    assert.equal(second.data.Value, "two");
    assert.ok(BigInt(second.res.headers["x-consul-index"]) > firstIndex);
  } finally {
    watch.end();
  }
  ok("blocking query");

  // Catalog registration of another node and its service.
  await consul.catalog.register({
    node: "db-node",
    address: "10.0.0.9",
    service: { id: "db-1", service: "db", port: 5432, tags: ["primary"] },
  });
  const nodes = await consul.catalog.node.list();
  assert.ok(nodes.some((n) => n.Node === "db-node"));
  const db = await consul.catalog.service.nodes("db");
  assert.equal(db[0].ServicePort, 5432);
  ok("catalog register");

  // KV: cas, recurse, keys.
  assert.equal(await consul.kv.set({ key: "app/config", value: "a", cas: 0 }), true);
  assert.ok(!await consul.kv.set({ key: "app/config", value: "b", cas: 0 }));
  const entry = await consul.kv.get("app/config");
  assert.equal(await consul.kv.set({ key: "app/config", value: "c", cas: entry.ModifyIndex }), true);
  assert.ok(!await consul.kv.set({ key: "app/config", value: "d", cas: entry.ModifyIndex }));
  assert.equal((await consul.kv.get("app/config")).Value, "c");
  ok("kv cas");
  await consul.kv.set("app/db/url", "postgres://db");
  const tree = await consul.kv.get({ key: "app/", recurse: true });
  assert.deepEqual(tree.map((e) => e.Key), ["app/config", "app/db/url"]);
  ok("kv recurse");
  assert.deepEqual(await consul.kv.keys({ key: "app/", separator: "/" }), ["app/config", "app/db/"]);
  ok("kv keys");

  // Sessions.
  const a = (await consul.session.create({ name: "a", ttl: "15s", lockdelay: "1s" })).ID;
  const b = (await consul.session.create({ name: "b", ttl: "15s", behavior: "delete" })).ID;
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  ok("session create");
  const renewed = await consul.session.renew(a);
  assert.equal(renewed[0].ID, a);
  assert.equal(renewed[0].TTL, "15s");
  ok("session renew");
  const info = await consul.session.info(b);
  assert.equal(info.Behavior, "delete");
  assert.equal(info.Name, "b");
  ok("session info");
  const listed = await consul.session.list();
  assert.deepEqual(listed.map((s) => s.ID).sort(), [a, b].sort());
  const onNode = await consul.session.node(info.Node);
  assert.equal(onNode.length, 2);
  ok("session list");

  // A lock: held by a, refused to b, released by a, then b takes it.
  assert.equal(await consul.kv.set({ key: "locks/leader", value: "a", acquire: a }), true);
  assert.ok(!await consul.kv.set({ key: "locks/leader", value: "b", acquire: b }));
  let held = await consul.kv.get("locks/leader");
  assert.equal(held.Session, a);
  assert.equal(held.LockIndex, 1);
  assert.equal(held.Value, "a");
  ok("lock refused to another session");
  assert.ok(!await consul.kv.set({ key: "locks/leader", value: "b", release: b }));
  assert.equal(await consul.kv.set({ key: "locks/leader", value: "free", release: a }), true);
  held = await consul.kv.get("locks/leader");
  assert.equal(held.Session, undefined);
  assert.equal(await consul.kv.set({ key: "locks/leader", value: "b", acquire: b }), true);
  held = await consul.kv.get("locks/leader");
  assert.equal(held.Session, b);
  assert.equal(held.LockIndex, 2);
  ok("lock released");

  // Destroying b deletes the key it holds (behavior "delete").
  await consul.session.destroy(b);
  assert.equal(await consul.kv.get("locks/leader"), undefined);
  assert.equal(await consul.session.info(b), undefined);
  ok("session destroy");

  // A transaction: all or nothing.
  const b64 = (s) => Buffer.from(s).toString("base64");
  const done = await consul.transaction.create([
    { KV: { Verb: "set", Key: "txn/a", Value: b64("1") } },
    { KV: { Verb: "set", Key: "txn/b", Value: b64("2") } },
    { KV: { Verb: "get", Key: "txn/a" } },
  ]);
  assert.equal(done.Results.length, 3);
  assert.equal(Buffer.from(done.Results[2].KV.Value, "base64").toString(), "1");
  let refused;
  try {
    await consul.transaction.create([
      { KV: { Verb: "set", Key: "txn/c", Value: b64("3") } },
      { KV: { Verb: "cas", Key: "txn/a", Value: b64("x"), Index: 1 } },
    ]);
  } catch (err) {
    refused = err;
  }
  assert.ok(refused, "a failing transaction is refused");
  assert.equal(refused.response.statusCode, 409);
  assert.equal(refused.response.body.Errors[0].OpIndex, 1);
  assert.equal(await consul.kv.get("txn/c"), undefined, "nothing of it was written");
  ok("txn");

  await consul.agent.service.deregister("web-1");
  assert.equal((await consul.agent.service.list())["web-1"], undefined);
  ok("agent service deregister");
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  if (err && err.response) console.error("response:", err.response.statusCode, err.response.body);
  process.exit(1);
});

"""Drives a Consul HTTP API with py-consul, a third-party Consul client (PyPI), used unchanged.

Usage: py_consul_client.py HOST:PORT

Each scenario prints `ok <scenario>`; the first failure raises, prints a traceback and exits
non-zero. Run by the Rust test tests/it/consul_clients.rs against `skyline registry`; the
registry's own node is `local` at 127.0.0.1 and its data directory starts empty.
"""

import sys
import threading
import time

import consul

DEADLINE = 15.0  # seconds any wait below may take at most


def eventually(what, probe):
    """Polls probe() until it returns a truthy value, at most DEADLINE seconds."""
    end = time.monotonic() + DEADLINE
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not true within {DEADLINE}s")
        time.sleep(0.05)


def later(delay, action):
    """Runs action() on a thread after delay seconds; join() the returned thread."""
    thread = threading.Thread(target=lambda: (time.sleep(delay), action()))
    thread.start()
    return thread


def statuses(c, service):
    _, nodes = c.health.service(service)
    return sorted(chk["Status"] for n in nodes for chk in n["Checks"])


def register_and_deregister(c):
    # py-consul sends lowercase keys: name, id, address, port, tags, meta, enabletagoverride.
    assert c.agent.service.register(
        "web", service_id="web-1", address="127.0.0.1", port=8080,
        tags=["v1"], meta={"team": "a"}, enable_tag_override=True,
    )
    svc = c.agent.services()["web-1"]
    assert (svc["Service"], svc["Port"], svc["Tags"], svc["Meta"]) == ("web", 8080, ["v1"], {"team": "a"}), svc
    _, nodes = c.catalog.service("web")
    assert [n["ServiceID"] for n in nodes] == ["web-1"], nodes
    assert c.agent.service.deregister("web-1")
    assert "web-1" not in c.agent.services()
    _, nodes = c.catalog.service("web")
    assert nodes == [], nodes


def ttl_pass_and_fail(c):
    assert c.agent.service.register("api", service_id="api-1", port=9000, check=consul.Check.ttl("30s"))
    assert statuses(c, "api") == ["critical"], "a new TTL check starts critical"
    assert c.agent.check.ttl_pass("service:api-1", "all good")
    assert statuses(c, "api") == ["passing"]
    _, checks = c.health.checks("api")
    assert checks[0]["Output"] == "all good", checks
    assert c.agent.check.ttl_warn("service:api-1")
    assert statuses(c, "api") == ["warning"]
    assert c.agent.check.ttl_fail("service:api-1", "down")
    assert statuses(c, "api") == ["critical"]


def health_passing(c):
    assert c.agent.check.ttl_fail("service:api-1")
    _, nodes = c.health.service("api", passing=True)
    assert nodes == [], "a critical instance is not passing"
    assert c.agent.check.ttl_pass("service:api-1")
    _, nodes = c.health.service("api", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["api-1"], nodes


def blocking_query(c):
    index, _ = c.health.service("api")
    started = time.monotonic()
    change = later(0.5, lambda: c.agent.check.ttl_fail("service:api-1", "blocked"))
    new_index, nodes = c.health.service("api", index=index, wait="20s")
    elapsed = time.monotonic() - started
    change.join()
    assert int(new_index) > int(index), (index, new_index)
    assert elapsed < 10, f"the blocking query returned after {elapsed:.1f}s, not on the change"
    assert nodes[0]["Checks"][0]["Status"] == "critical", nodes
    # Without a change it waits its full wait and answers with the same index.
    started = time.monotonic()
    same_index, _ = c.health.service("api", index=new_index, wait="1s")
    assert same_index == new_index and time.monotonic() - started >= 0.9
    print(f"  blocking query woke after {elapsed:.2f}s at index {new_index} (was {index})")


def catalog_register(c):
    # py-consul sends {"node": ..., "address": ...}; the service and check as given here.
    assert c.catalog.register(
        "node-2", "10.0.0.2",
        service={"service": "db", "id": "db-1", "port": 5432, "tags": ["primary"]},
        check={"CheckID": "db-alive", "Name": "db alive", "Status": "passing", "ServiceID": "db-1"},
    )
    _, nodes = c.catalog.service("db")
    assert [(n["Node"], n["ServiceID"], n["ServicePort"]) for n in nodes] == [("node-2", "db-1", 5432)], nodes
    _, nodes = c.health.service("db", passing=True)
    assert len(nodes) == 1, nodes
    _, all_nodes = c.catalog.nodes()
    assert "node-2" in [n["Node"] for n in all_nodes]
    _, services = c.catalog.services()
    assert services.get("db") == ["primary"], services


def catalog_node(c):
    _, node = c.catalog.node("node-2")
    assert node["Node"]["Address"] == "10.0.0.2", node
    assert node["Services"]["db-1"]["Port"] == 5432, node
    _, missing = c.catalog.node("no-such-node")
    assert missing is None


def catalog_deregister(c):
    assert c.catalog.register("node-3", "10.0.0.3", service={"Service": "tmp", "ID": "tmp-1"})
    assert c.catalog.deregister("node-3", service_id="tmp-1")  # sends "serviceid"
    _, nodes = c.catalog.service("tmp")
    assert nodes == [], nodes
    assert c.catalog.deregister("node-3")
    _, node = c.catalog.node("node-3")
    assert node is None, node


def kv(c):
    assert c.kv.put("app/config", "v1", flags=7)
    _, item = c.kv.get("app/config")
    assert (item["Value"], item["Flags"]) == (b"v1", 7), item
    modify = item["ModifyIndex"]
    assert c.kv.put("app/config", "v2", cas=modify)
    assert not c.kv.put("app/config", "v3", cas=modify), "a stale cas must fail"
    _, item = c.kv.get("app/config")
    assert item["Value"] == b"v2", item
    assert not c.kv.put("app/new", "x", cas=1), "cas on a missing key must fail"
    assert c.kv.put("app/new", "x", cas=0), "cas=0 creates a missing key"
    assert c.kv.put("app/sub/deep", "y")
    _, items = c.kv.get("app/", recurse=True)
    assert [i["Key"] for i in items] == ["app/config", "app/new", "app/sub/deep"], items
    _, keys = c.kv.get("app/", keys=True)
    assert keys == ["app/config", "app/new", "app/sub/deep"], keys
    _, keys = c.kv.get("app/", keys=True, separator="/")
    assert keys == ["app/config", "app/new", "app/sub/"], keys
    assert c.kv.delete("app/", recurse=True)
    _, item = c.kv.get("app/config")
    assert item is None


def health_state_and_node(c):
    assert c.agent.check.ttl_fail("service:api-1")
    _, critical = c.health.state("critical")
    assert "service:api-1" in [chk["CheckID"] for chk in critical], critical
    _, passing = c.health.state("passing")
    assert "db-alive" in [chk["CheckID"] for chk in passing], passing
    _, every = c.health.state("any")
    assert {"service:api-1", "db-alive"} <= {chk["CheckID"] for chk in every}, every
    _, checks = c.health.node("node-2")
    assert [chk["CheckID"] for chk in checks] == ["db-alive"], checks
    assert c.agent.check.ttl_pass("service:api-1")


def agent_self_and_members(c):
    me = c.agent.self()
    assert me["Config"]["NodeName"] == "local" and me["Config"]["Datacenter"] == "dc1", me
    assert me["Member"]["Name"] == "local"
    members = c.agent.members()
    assert [m["Name"] for m in members] == ["local"], members
    assert c.catalog.datacenters() == ["dc1"]
    _, coords = c.coordinate.nodes()
    assert {"local", "node-2"} <= {x["Node"] for x in coords}, coords


def check_register(c):
    # py-consul sends name, ttl, id, notes and serviceid in lowercase.
    assert c.agent.check.register("disk", check=consul.Check.ttl("30s"), check_id="disk-1", notes="root fs")
    chk = c.agent.checks()["disk-1"]
    assert (chk["Name"], chk["Status"], chk["Notes"], chk["ServiceID"]) == ("disk", "critical", "root fs", ""), chk
    assert c.agent.check.ttl_pass("disk-1")
    assert c.agent.checks()["disk-1"]["Status"] == "passing"
    assert c.agent.check.register("api-extra", check=consul.Check.ttl("30s"), check_id="api-extra", service_id="api-1")
    assert c.agent.checks()["api-extra"]["ServiceID"] == "api-1"
    _, nodes = c.health.service("api", passing=True)
    assert nodes == [], "a new critical check on the service makes it not passing"
    assert c.agent.check.deregister("api-extra")
    assert c.agent.check.deregister("disk-1")
    assert "disk-1" not in c.agent.checks() and "api-extra" not in c.agent.checks()
    _, nodes = c.health.service("api", passing=True)
    assert len(nodes) == 1, nodes


def maintenance(c):
    assert c.agent.maintenance(True, "kernel upgrade")
    chk = c.agent.checks()["_node_maintenance"]
    assert (chk["Status"], chk["Notes"]) == ("critical", "kernel upgrade"), chk
    _, nodes = c.health.service("api", passing=True)
    assert nodes == [], "a node in maintenance has no passing instance"
    assert c.agent.maintenance(False)
    assert "_node_maintenance" not in c.agent.checks()
    assert c.agent.service.maintenance("api-1", True)
    chk = c.agent.checks()["_service_maintenance:api-1"]
    assert chk["ServiceID"] == "api-1" and "no reason was provided" in chk["Notes"], chk
    _, nodes = c.health.service("api", passing=True)
    assert nodes == []
    assert c.agent.service.maintenance("api-1", False)
    _, nodes = c.health.service("api", passing=True)
    assert len(nodes) == 1, nodes


def events(c):
    fired = c.event.fire("deploy", "v2")
    assert fired["Name"] == "deploy" and fired["ID"], fired
    index, listed = c.event.list(name="deploy")
    assert [(e["ID"], e["Payload"]) for e in listed] == [(fired["ID"], b"v2")], listed
    # A blocking list returns when the next event arrives.
    started = time.monotonic()
    fire = later(0.5, lambda: c.event.fire("deploy", "v3"))
    new_index, listed = c.event.list(name="deploy", index=index, wait="20s")
    fire.join()
    assert new_index != index and time.monotonic() - started < 10
    assert [e["Payload"] for e in listed] == [b"v2", b"v3"], listed
    # An event for another node is not kept by this one.
    c.event.fire("deploy", "elsewhere", node="^other-node$")
    _, listed = c.event.list(name="deploy")
    assert len(listed) == 2, listed


SCENARIOS = [
    register_and_deregister,
    ttl_pass_and_fail,
    health_passing,
    blocking_query,
    catalog_register,
    catalog_node,
    catalog_deregister,
    kv,
    health_state_and_node,
    agent_self_and_members,
    check_register,
    maintenance,
    events,
]


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    c = consul.Consul(host=host, port=int(port))
    print(f"py-consul {getattr(consul, '__version__', '?')} against {sys.argv[1]}")
    for scenario in SCENARIOS:
        scenario(c)
        print(f"ok {scenario.__name__}", flush=True)
    print(f"all {len(SCENARIOS)} scenarios passed")


if __name__ == "__main__":
    main()

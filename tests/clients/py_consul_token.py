"""py-consul (PyPI, unchanged) against a token-protected `skyline registry`.

Usage: py_consul_token.py HOST:PORT TOKEN

With the token, py-consul registers a service and reads it back; without one, and with a
wrong one, it gets Consul's ACL answer, which py-consul raises as ACLPermissionDenied (403)
with the body. Prints one `ok <step>` line per step, then `denied <body>` lines for the
refusals; the first failure raises and exits non-zero. Run by tests/it/control_tokens.rs.
"""

import sys

import consul
from consul.exceptions import ACLPermissionDenied

host, port = sys.argv[1].rsplit(":", 1)
token = sys.argv[2]

with_token = consul.Consul(host=host, port=int(port), token=token)
assert with_token.agent.service.register("web", service_id="web-1", port=8080) is True
print("ok register with the token")
_, nodes = with_token.catalog.service("web")
assert [n["ServiceID"] for n in nodes] == ["web-1"], nodes
print("ok catalog read with the token")

for label, client in [
    ("none", consul.Consul(host=host, port=int(port))),
    ("wrong", consul.Consul(host=host, port=int(port), token="not-" + token)),
]:
    try:
        client.agent.service.register("intruder", port=9999)
    except ACLPermissionDenied as e:
        print(f"denied {label} {e}")
    else:
        raise AssertionError(f"a register with token {label} was accepted")

_, nodes = with_token.catalog.service("intruder")
assert nodes == [], nodes
print("ok nothing registered without the token")

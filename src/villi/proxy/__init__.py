"""villi.proxy — the per-node transparent HTTP proxy that enforces L7 policy.

``villi-proxy`` runs as its own process in the node's network namespace, so an agent
restart does not cut L7 traffic. The datapath steers redirected connections to its
listeners (``bpf_sk_assign``); it reads the original destination from the accepted
socket, evaluates each request against the HTTP rules in force at that request, and
connects upstream from the client's own address (``IP_TRANSPARENT``), so the server and
its policy still see the client.

Modules: ``store`` (rules + ipcache the agent feeds, kept while the agent is away),
``_wire`` (canned responses, limits, counters, httptools callback objects),
``relay`` (one client connection: HTTP/1.1 parsing with httptools, verdicts, streaming),
``records`` (L7 records sent back to the agent's observer), ``control`` (the unix socket
protocol, server side and the agent's client), ``server`` (listeners, counters),
``main`` (the ``villi-proxy`` command).
"""

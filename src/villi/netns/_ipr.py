"""Open pyroute2 netlink sockets inside a namespace without forking.

pyroute2's ``IPRoute(netns=...)`` forks a helper process to create the socket in the
target namespace; from a non-main thread that helper fails (it installs signal
handlers) and its cleanup then signals the whole process group — it killed the agent.
A netlink socket belongs to the namespace of the thread that creates it, so entering
the namespace on this thread (``villi._nsenter``) and opening a plain ``IPRoute()``
there gives the same socket with no fork.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from villi._nsenter import in_netns


def ipr_in(netns: str | None) -> IPRoute:
    """An ``IPRoute`` bound to ``netns`` (name or path; None = this thread's)."""
    with in_netns(netns):
        return IPRoute()

"""Network namespaces, veth pairs, addresses, routes and sysctls (via pyroute2).

The only package besides ``datapath`` that changes the kernel's network state. It
knows nothing of policy or identities: it builds the plumbing the endpoint layer asks
for, and removes it again.
"""

from villi.netns.namespaces import (
    create_netns,
    delete_netns,
    netns_exists,
    set_sysctl,
)
from villi.netns.veth import PodLink, create_pod_link, delete_link, link_info

__all__ = [
    "PodLink",
    "create_netns",
    "create_pod_link",
    "delete_link",
    "delete_netns",
    "link_info",
    "netns_exists",
    "set_sysctl",
]

/* SPDX-License-Identifier: Apache-2.0 */
/* config.h — per-node settings with defaults.
 *
 * API: every tunable the programs read at compile time. The agent generates
 * node_config.h (node IP, cluster CIDR, aggregation level, map sizes …) and puts it
 * on the include path; anything it leaves out takes the default below.
 */
#ifndef __VILLI_CONFIG_H
#define __VILLI_CONFIG_H

#include "node_config.h"

#ifndef NODE_IPV4
#define NODE_IPV4 0                     /* network order */
#endif
#ifndef MONITOR_AGGREGATION
#define MONITOR_AGGREGATION AGGREGATION_MEDIUM
#endif
#ifndef CT_REPORT_INTERVAL
#define CT_REPORT_INTERVAL 5            /* seconds between periodic flow events */
#endif
#ifndef CT_LIFETIME_TCP
#define CT_LIFETIME_TCP 8000            /* seconds, established TCP */
#endif
#ifndef CT_LIFETIME_SYN
#define CT_LIFETIME_SYN 60
#endif
#ifndef CT_LIFETIME_NONTCP
#define CT_LIFETIME_NONTCP 60
#endif
#ifndef CT_LIFETIME_CLOSE
#define CT_LIFETIME_CLOSE 10
#endif
#ifndef ENABLE_HOST_ROUTING
#define ENABLE_HOST_ROUTING 1           /* same-node delivery with bpf_redirect_peer */
#endif
#ifndef GUARDED_MAP_SIZE
#define GUARDED_MAP_SIZE 256
#endif
#ifndef IPCACHE_MAP_SIZE
#define IPCACHE_MAP_SIZE 512000
#endif
#ifndef ENDPOINTS_MAP_SIZE
#define ENDPOINTS_MAP_SIZE 65535
#endif
#ifndef POLICY_MAP_SIZE
#define POLICY_MAP_SIZE 1048576
#endif
#ifndef CT_MAP_SIZE
#define CT_MAP_SIZE 262144
#endif
#ifndef EVENTS_RINGBUF_SIZE
#define EVENTS_RINGBUF_SIZE (8 * 1024 * 1024)
#endif

#endif /* __VILLI_CONFIG_H */

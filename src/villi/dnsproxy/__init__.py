"""The DNS proxy core: DNS rules per endpoint, forwarding, per-endpoint caches with TTLs and
zombies, the name manager that turns learned IPs into FQDN identity labels, and Hubble
DNS records. The node's proxy process (``villi-proxy``) hosts it behind the eBPF
steering; nothing here depends on how packets arrive."""

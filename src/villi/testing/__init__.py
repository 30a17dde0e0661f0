"""Test seams shipped with villi: throw-away namespaces and single-node topologies,
a real etcd on loopback, in-memory stores. Everything here cleans up after itself."""

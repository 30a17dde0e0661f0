"""villi: eBPF networking, network security and flow observability for containers."""

__version__ = "0.1.0"

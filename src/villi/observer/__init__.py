"""Flow observability: the flow ring, filters, Hubble-format flows and metrics.

The agent drains the datapath's ``events`` ringbuf in batches of raw records
(``villi.datapath.ringbuf``); this package keeps them in a ring, counts metrics and
applies filters with numpy (no Python per record on the ingest path), and turns only
the records a reader asks for into Hubble-shaped flow dicts (``flow.py``).
"""

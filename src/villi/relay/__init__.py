"""``villi relay``: one view of the flows of every agent, across hosts (Hubble Relay).

A program at the level of the agent and operator: it may use the observer's filters
and the kvstore (to discover agents); nothing imports it.
"""

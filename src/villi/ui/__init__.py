"""``villi ui``: a web page over the relay — service map, flows table, explanations.

A program at the level of the agent and operator; it talks to the relay over its HTTP
API and imports only the observer's helpers. Nothing imports it.
"""

"""The rules, with no I/O: entity states and their transitions, what Capillary's answers mean
and the worker's own reference (``model``), the inbound event and where bad input is turned
away (``events``), every retry, backoff, dead-letter and pause decision (``policy``), the one
exception hierarchy (``errors``) and outside text made safe to store, log and show (``text``).
It imports nothing of the project above it: no adapter, use case or entrypoint, so that it is
tested without I/O and every other layer may use it.
"""

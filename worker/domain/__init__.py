"""The rules, with no I/O: entity states and their transitions, what Capillary's answers mean
and the worker's own reference (``model``), the inbound event and where bad input is turned
away (``events``), what an answer proves about each series (``verdicts``), every retry, backoff,
dead-letter and circuit decision about an entity (``policy``) and the runtime's decisions about
messages and consumers (``runtime_policy``), the one exception hierarchy (``errors``) and outside
text made safe to store, log and show (``text``). It imports nothing of the project above it: no
adapter, use case, entrypoint nor the settings (the composition root builds the policies from
them), so that it is tested without I/O and every other layer may use it.
"""

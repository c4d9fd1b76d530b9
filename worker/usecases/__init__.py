"""The use cases: issue an event, retry an entity, sweep the ledger and record a rejection
(``issue``), with the claims' renewal while their task runs (``leases``); a message that fails
for a reason not its own (``delivery``); support engineers' replay, discard and resubmit
(``support``) and the console's replay jobs (``replay_jobs``); retention (``retention``); the
read side as named queries (``queries``). They are handed their dependencies (the ledger's unit
of work, the Capillary client, the publisher, the limits) and may import the domain and the
adapters' seams and records, never an entrypoint nor the composition root.
"""

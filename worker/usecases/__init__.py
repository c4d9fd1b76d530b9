"""The use cases: issue an event or retry an entity (``issue``), one attempt's outcome committed
(``attempt``) and an unknown outcome settled by read-back (``reconcile``), with the claims'
renewal while their task runs (``leases``); the sweeper's periodic work (``sweep``); a message
that is not a valid event (``rejection``) or that fails for a reason not its own
(``delivery``); support engineers' replay, discard and resubmit (``support``) and the console's
replay jobs (``replay_jobs``); the circuit closed by hand (``circuit_control``); retention
(``retention``); the read side as named queries (``queries``). They are handed their
dependencies (``deps``: the ledger's unit of work, the Capillary client, the publisher, the
limits) and may import the domain and the adapters' seams and records, never an entrypoint nor
the composition root.
"""

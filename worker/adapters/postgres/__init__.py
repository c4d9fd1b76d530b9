"""The PostgreSQL ledger: events, entities, calls, coupons, rejections and operator actions.
Every SQL statement of the worker lives in this package.

``models`` holds the schema; ``repository`` the ``Ledger`` the use cases are handed, made of
one part per consumer, each a protocol beside its statements: ``issuing`` (the hot path: take
in, claim, record; rejections, leases, failed deliveries), ``sweeping`` (the sweeper's work),
``circuit_store`` (the circuit's row) and ``support`` (operator actions), over the tables and
statements they share (``tables``) and the hot path's two SQL statements (``hot_path``); the
in-memory fake is ``coupon_devtools.fakes.ledger``. ``reads`` holds the read side's statements
(the support commands', the console's), ``vitals`` what on-call reads at each scrape, ``jobs``
and ``retention`` the replay jobs' and the pruning's statements, ``console_sessions`` and
``login_limits`` the console's sessions and login limits. ``unit_of_work`` is the transaction
boundary, ``driver`` what the driver's errors mean, ``migrate``, ``schema`` and ``roles`` the
migrations, the schema check and the roles per job, and ``ratelimit`` and ``circuit`` the
fleet-wide limits kept in the database. It may import the domain, the settings and the other
adapters' records, never a use case or an entrypoint.
"""

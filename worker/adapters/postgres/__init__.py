"""The PostgreSQL ledger: events, entities, calls, coupons, rejections and operator actions.

``models`` holds the schema, ``repository`` and ``hot_path`` the statements the use cases need
(behind the ``Ledger`` protocol; the in-memory fake is ``coupon_devtools.fakes.ledger``),
``unit_of_work`` the transaction boundary, ``driver`` what the driver's errors mean, ``support``,
``jobs`` and ``retention`` the support commands', the replay jobs' and the pruning's statements,
``migrate``, ``schema`` and ``roles`` the migrations, the schema check and the roles per job,
and ``ratelimit`` and ``circuit`` the fleet-wide limits kept in the database. It may import the
domain, the settings and the other adapters' records, never a use case or an entrypoint.
"""

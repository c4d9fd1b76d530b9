"""The PostgreSQL ledger: events, entities, calls, coupons, rejections and operator actions.

``models`` holds the schema, ``repository`` the statements the services need (behind the
``Ledger`` protocol, with ``fake.InMemoryLedger`` for unit tests), ``unit_of_work`` the
transaction boundary and ``views`` the read side used by the command line.
"""

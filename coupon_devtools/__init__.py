"""The tooling around coupon-worker, apart from the runtime (the ``devtools`` extra).

- :mod:`coupon_devtools.harness`: databases, RabbitMQ vhosts and subprocesses, shared by the
  tests, the demo, the bench and the chaos run;
- :mod:`coupon_devtools.fakes`: in-memory fakes of the runtime's seams (ledger, Capillary,
  publisher) for the unit tests and the bench;
- :mod:`coupon_devtools.sandbox`: a stand-in for Capillary's API, with faults on demand;
- :mod:`coupon_devtools.demo`, :mod:`coupon_devtools.bench`, :mod:`coupon_devtools.chaos`:
  the ``coupon-worker demo``, ``bench`` and ``chaos`` commands;
- :mod:`coupon_devtools.filebroker`: the file-based kombu transport of the demo's no-server
  fallback.

The runtime (:mod:`worker`) never imports this package; its command line finds the commands
here lazily (an import-linter contract keeps it so).
"""

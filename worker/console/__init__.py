"""The support console: a server-rendered web app over the same ledger and support services as
the command line (``coupon-worker console``)."""

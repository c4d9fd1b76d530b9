"""Where work enters: the Celery app with its tasks and bootsteps (``celery``), the
``coupon-worker`` command line (``cli``) and the support console (``console``). Each parses what
comes in, hands it to a use case with the dependencies the composition root
(``worker.bootstrap``) built, and shows or acknowledges the outcome. They may import every layer
below them; nothing in the runtime imports them back.
"""

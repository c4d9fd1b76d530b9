"""``python -m coupon_devtools.filebroker ARGS``: ``coupon-worker ARGS`` with ``cwfile://``
registered, for the demo's children on the file broker."""

from coupon_devtools.filebroker import register
from worker.entrypoints.cli import main

register()
main(prog_name="coupon-worker")

"""``python -m coupon_devtools.chaos``: the chaos run without the installed script."""

from coupon_devtools.chaos.command import chaos_command

chaos_command()(prog_name="coupon-worker chaos")

"""``python -m coupon_devtools.demo``: the demo without the installed script."""

from coupon_devtools.demo.command import demo_command

demo_command()(prog_name="coupon-worker demo")

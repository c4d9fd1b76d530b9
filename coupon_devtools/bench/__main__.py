"""``python -m coupon_devtools.bench``: the bench without the installed script."""

from coupon_devtools.bench.command import bench_command

bench_command()(prog_name="coupon-worker bench")

"""``coupon-worker demo``: the whole pipeline on defaults that need no setup."""

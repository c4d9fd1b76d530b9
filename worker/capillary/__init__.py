"""Capillary's coupon APIs: the ``CouponApi`` seam, the real HTTP client, how its answers are
read (``answers``) and a fake."""

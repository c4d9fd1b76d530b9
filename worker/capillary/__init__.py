"""Capillary's coupon APIs: the ``CouponApi`` seam, the real HTTP client and a fake."""

"""Capillary's coupon APIs: the ``CouponApi`` seam and what a call returns (``api``), the real
HTTP client (``client``), its two auth schemes (``auth``) and how its answers are read
(``answers``); a call's error and an entry's share one shape (``worker.domain.model.EntryError``).
The fake lives with the dev tools (``coupon_devtools.fakes.capillary``). It may import the
domain and the settings, never a use case or an entrypoint.
"""

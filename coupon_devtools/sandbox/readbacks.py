"""The three read-back APIs over the sandbox's ledger: their queries and their answers."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta, timezone

from coupon_devtools.sandbox.config import SandboxConfig
from coupon_devtools.sandbox.inputs import (
    DEFAULT_READBACK_LIMIT,
    MAX_READBACK_LIMIT,
    MAX_V2_COUPON_PAGE,
    Clock,
    JsonDict,
    ReadbackApi,
    SandboxInputError,
    render_time,
)
from coupon_devtools.sandbox.records import (
    ApiAnswer,
    IssuedCoupon,
    ReadbackQuery,
    int_list,
    issual_details,
    query_int,
    split_csv,
    v11_status,
)


class ReadbackRules:
    """The read-back rules of :class:`~coupon_devtools.sandbox.state.SandboxState`, which
    provides what they read: the config, the coupons by customer and identifier lookup."""

    config: SandboxConfig
    _by_customer: dict[str, list[IssuedCoupon]]
    _now: Clock

    def resolve_identifier(self, kind: str, value: str) -> str:
        """The customer id for an identifier (the state's registry answers)."""
        raise NotImplementedError

    def parse_readback(self, api: ReadbackApi, query: Mapping[str, str]) -> ReadbackQuery:
        """Validate a read-back query string; raises :class:`SandboxInputError`."""
        if api == "v2_coupon":
            raw_ids = query.get("issuedToIds")
            if not raw_ids:
                raise SandboxInputError("issuedToIds is required")
            series = query.get("seriesId")
            return ReadbackQuery(
                api=api,
                customer_ids=tuple(split_csv("issuedToIds", raw_ids)),
                series_ids=int_list("seriesId", series) if series else (),
                include_details=query.get("includeIssualDetails", "").lower() == "true",
                limit=min(query_int(query, "limit", DEFAULT_READBACK_LIMIT,
                                     maximum=MAX_READBACK_LIMIT), MAX_V2_COUPON_PAGE),
                offset=query_int(query, "offset", 0, maximum=10**9),
            )
        if api == "v11_customer_coupons":
            return self._parse_v11(query)
        raw_id = query.get("id")
        if not raw_id:
            raise SandboxInputError("id is required")
        return ReadbackQuery(
            api=api,
            customer_ids=(raw_id,),
            limit=query_int(query, "limit", DEFAULT_READBACK_LIMIT, maximum=MAX_READBACK_LIMIT),
            offset=query_int(query, "offset", 0, maximum=10**9),
        )

    def _parse_v11(self, query: Mapping[str, str]) -> ReadbackQuery:
        for param, kind in (
            ("id", "id"),
            ("mobile", "mobile"),
            ("email", "email"),
            ("external_id", "externalId"),
        ):
            raw = query.get(param)
            if raw:
                customer_ids = tuple(
                    self.resolve_identifier(kind, v) for v in split_csv(param, raw)
                )
                break
        else:
            raise SandboxInputError("one of id, mobile, email, external_id is required")
        start_date = None
        if raw_start := query.get("start_date"):
            try:
                start_date = date.fromisoformat(raw_start)
            except ValueError as exc:
                raise SandboxInputError(
                    f"start_date must be YYYY-MM-DD, got {raw_start!r}"
                ) from exc
        order_by = query.get("order_by", "created_date")
        if order_by != "created_date":
            raise SandboxInputError(f"order_by supports only created_date, got {order_by!r}")
        sort_order = query.get("sort_order", "asc").lower()
        if sort_order not in ("asc", "desc"):
            raise SandboxInputError(f"sort_order must be asc or desc, got {sort_order!r}")
        series = query.get("series_id")
        return ReadbackQuery(
            api="v11_customer_coupons",
            customer_ids=customer_ids,
            series_ids=int_list("series_id", series) if series else (),
            start_date=start_date,
            descending=sort_order == "desc",
        )

    def answer_readback(self, query: ReadbackQuery) -> ApiAnswer:
        """Answer a validated read-back query from the ledger."""
        tz = self.config.tz
        if query.api == "v2_coupon":
            data: list[JsonDict] = []
            for customer_id in query.customer_ids:
                for coupon in self._coupons_of(customer_id, query.series_ids):
                    item: JsonDict = {
                        "id": coupon.id,
                        "code": coupon.code,
                        "seriesId": coupon.series_id,
                        "issuedTo": coupon.customer_id,
                        "issuedDate": render_time(coupon.issued_at, tz),
                        "validTill": coupon.valid_till,
                        "validTillDateTime": coupon.valid_till_date_time,
                    }
                    if query.include_details:
                        item["couponIssualDetails"] = issual_details(coupon.metadata)
                    data.append(item)
            shown = data[query.offset : query.offset + query.limit]
            return ApiAnswer(200, {"data": shown, "errors": None})
        if query.api == "v11_customer_coupons":
            return ApiAnswer(200, self._v11_body(query, tz))
        customer_id = query.customer_ids[0]
        coupons = self._coupons_of(customer_id, ())
        page = coupons[query.offset : query.offset + query.limit]
        return ApiAnswer(
            200,
            {
                "customers": [
                    {
                        "id": customer_id,
                        "coupons": [
                            {
                                "code": c.code,
                                "seriesId": c.series_id,
                                "createdDate": render_time(c.issued_at, tz),
                                "validTill": c.valid_till,
                                "validTillDateTime": c.valid_till_date_time,
                            }
                            for c in page
                        ],
                    }
                ],
                "pagination": {
                    "limit": query.limit,
                    "offset": query.offset,
                    "total": len(coupons),
                },
            },
        )

    def _v11_body(self, query: ReadbackQuery, tz: timezone) -> JsonDict:
        customers: list[JsonDict] = []
        for customer_id in query.customer_ids:
            coupons = [
                c
                for c in self._coupons_of(customer_id, query.series_ids)
                if query.start_date is None or c.issued_at.astimezone(tz).date() >= query.start_date
            ]
            if query.descending:
                coupons.reverse()
            customers.append(
                {
                    "id": customer_id,
                    "coupons": {
                        "coupon": [
                            {
                                "id": c.id,
                                "code": c.code,
                                "series_id": c.series_id,
                                "created_date": render_time(c.issued_at, tz),
                                "valid_till": c.valid_till,
                            }
                            for c in coupons
                        ]
                    },
                }
            )
        return {
            "response": {
                "status": v11_status(True, 200, "SUCCESS"),
                "customers": {"customer": customers},
            }
        }

    def _coupons_of(self, customer_id: str, series_ids: tuple[int, ...]) -> list[IssuedCoupon]:
        coupons = self._by_customer.get(customer_id, [])
        lag_s = self.config.readback_lag_s
        if lag_s > 0:
            # Defensive assumption: a read-back served by a replica lagging the write.
            seen_until = self._now() - timedelta(seconds=lag_s)
            coupons = [c for c in coupons if c.issued_at <= seen_until]
        if not series_ids:
            return list(coupons)
        return [c for c in coupons if c.series_id in series_ids]

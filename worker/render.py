"""Rich tables for the command line (kept apart so the commands stay short)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def table(title: str, columns: list[str]) -> Table:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    return t


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def render_event(console: Console, story: dict[str, Any]) -> None:
    """An event as support engineers read it: summary, entities, history, coupons."""
    console.print(
        f"[bold]event[/] {story['event_id']}  state=[bold]{story['state']}[/]  "
        f"customer={story.get('customer_key', '')}  received={story.get('received_at', '')}  "
        f"source={story.get('source', '')}",
        highlight=False,
    )
    for rejection in story.get("rejections", []):
        console.print(
            f"[red]rejected[/] #{rejection['id']} at {rejection['received_at']} "
            f"({rejection['source']}): {rejection['reason']}", highlight=False)
    entities = story.get("entities", [])
    if entities:
        t = table("entities", ["id", "series", "state", "attempts", "last error", "request id",
                               "next attempt"])
        for e in entities:
            parts = (_s(e["last_error_code"]), _s(e["last_error_message"]))
            error = " ".join(x for x in parts if x)
            t.add_row(_s(e["id"]), _s(e["series_id"]), e["state"], _s(e["attempts"]), error,
                      _s(e["last_request_id"]), _s(e["next_attempt_at"]))
        console.print(t)
        h = table("history", ["at", "entity", "what", "state", "attempt", "error", "message",
                              "request id"])
        for e in entities:
            for item in e["history"]:
                h.add_row(_s(item["at"]), _s(e["id"]), item["kind"], item["state"],
                          _s(item["attempt"]), _s(item["error_code"]), _s(item["message"]),
                          _s(item["request_id"]))
        console.print(h)
    coupons = story.get("coupons", [])
    if coupons:
        c = table("coupons", ["series", "code", "discount", "valid till", "issued at", "via"])
        for coupon in coupons:
            discount = f"{_s(coupon['discount_type'])} {_s(coupon['discount_value'])}".strip()
            c.add_row(_s(coupon["series_id"]), coupon["code"], discount,
                      _s(coupon["valid_till_date_time"] or coupon["valid_till"]),
                      _s(coupon["issued_at"]), _s(coupon["recorded_via"]))
        console.print(c)
    else:
        console.print("no coupons issued for this event", highlight=False)

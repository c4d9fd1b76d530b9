"""Rich tables for the command line (kept apart so the commands stay short)."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.table import Table


def table(title: str, columns: list[str]) -> Table:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    return t


_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d+)?([+-]\d{2}:\d{2}|Z)$")


def _s(value: Any) -> str:
    """Text for a cell; ISO timestamps shortened to the second (UTC stays implicit)."""
    if value is None:
        return ""
    text = str(value)
    match = _ISO.match(text)
    if match:
        zone = match.group(4)
        suffix = "" if zone in ("+00:00", "Z") else zone
        return f"{match.group(1)} {match.group(2)}{suffix}"
    return text


def render_event(console: Console, story: dict[str, Any]) -> None:
    """An event as support engineers read it: summary, entities, history, coupons."""
    console.print(
        f"[bold]event[/] {story['event_id']}  state=[bold]{story['state']}[/]  "
        f"customer={story.get('customer_key', '')}  received={_s(story.get('received_at'))}  "
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
            error = "" if e["state"] == "issued" else " ".join(x for x in parts if x)
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


def render_dead_letters(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no dead letters", highlight=False)
        return
    from worker.domain import describe_error

    t = Table(title=f"dead letters ({len(rows)})", title_justify="left")
    for column in ("kind", "id", "event", "customer", "series"):
        t.add_column(column, no_wrap=column in ("kind", "id", "series"), overflow="fold")
    t.add_column("error", overflow="fold")
    t.add_column("tries", no_wrap=True)
    t.add_column("dead since", overflow="fold")
    t.add_column("detail", overflow="fold")
    for r in rows:
        detail = _s(r.get("reason") or r.get("message"))
        t.add_row(r["kind"], _s(r["id"]), _s(r.get("event_id")), _s(r.get("customer")),
                  _s(r.get("series_id")), describe_error(r.get("error_code")),
                  _s(r.get("attempts")), _s(r.get("dead_at")), detail)
    console.print(t)


def render_summary(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no dead letters", highlight=False)
        return
    from worker.domain import describe_error

    t = table("dead letters by error and series",
              ["error", "series", "entities", "customers", "first", "last"])
    for r in rows:
        t.add_row(describe_error(r["error_code"]), _s(r["series_id"]), _s(r["count"]),
                  _s(r["customers"]), _s(r["first"]), _s(r["last"]))
    console.print(t)


def render_entity(console: Console, e: dict[str, Any]) -> None:
    """One entity's whole story."""
    from worker.domain import describe_error

    console.print(
        f"[bold]entity[/] {e['id']}  event={e['event_id']}  customer={e['customer_key']}  "
        f"series={e['series_id']}  state=[bold]{e['state']}[/]  attempts={e['attempts']}  "
        f"last error={describe_error(e['last_error_code'])}"
        + ("  [yellow]outcome unknown: reconciles before any re-issue[/]"
           if e.get("needs_reconcile") else ""),
        highlight=False,
    )
    if e.get("dead_reason"):
        console.print(f"dead: {e['dead_reason']} (since {_s(e['dead_at'])})", highlight=False)
    h = table("history", ["at", "what", "state", "attempt", "error", "message", "request id",
                          "by"])
    for item in e["history"]:
        h.add_row(_s(item["at"]), item["kind"], item["state"], _s(item["attempt"]),
                  _s(item["error_code"]), _s(item["message"]), _s(item["request_id"]),
                  _s(item["worker"]))
    console.print(h)
    if e["calls"]:
        c = table("Capillary calls", ["at", "operation", "status", "ms", "outcome", "error",
                                      "request id"])
        for call in e["calls"]:
            c.add_row(_s(call["started_at"]), call["operation"], _s(call["http_status"]),
                      f"{call['latency_ms']:.0f}", call["outcome"], _s(call["error_code"]),
                      _s(call["request_id"]))
        console.print(c)
    if e.get("coupon"):
        coupon = e["coupon"]
        console.print(f"coupon {coupon['code']} valid till "
                      f"{coupon['valid_till_date_time'] or coupon['valid_till']} "
                      f"(recorded via {coupon['recorded_via']})", highlight=False)
    if e["operator_actions"]:
        a = table("operator actions", ["at", "action", "operator", "reason", "outcome"])
        for action in e["operator_actions"]:
            a.add_row(_s(action["at"]), action["action"], action["operator"], action["reason"],
                      action["outcome"])
        console.print(a)


def render_actions(console: Console, results: list[Any], *, dry_run: bool) -> None:
    t = table("dry run: nothing changed" if dry_run else "done",
              ["entity", "event", "customer", "series", "state before", "outcome"])
    for r in results:
        t.add_row(_s(r.entity_id), r.event_id, r.customer, _s(r.series_id), r.state_before,
                  r.outcome)
    console.print(t)


def render_duplicates(console: Console, rows: list[dict[str, Any]], advice: str) -> None:
    """Entities found holding two of our coupons, with what support does about them."""
    t = table(f"duplicates ({len(rows)})",
              ["entity", "event", "customer", "series", "codes", "found at"])
    for row in rows:
        t.add_row(_s(row["id"]), _s(row["event_id"]), _s(row["customer"]),
                  _s(row["series_id"]), _s(", ".join(row["codes"])), _s(row["found_at"]))
    console.print(t)
    console.print(advice, highlight=False)

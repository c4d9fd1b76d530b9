"""Rich tables for the command line (kept apart so the commands stay short).

Everything shown comes from the ledger, and much of it from the outside (event ids, reasons,
Capillary's messages, raw payloads). Values therefore never go through rich's markup or emoji
parsing: they become plain ``Text`` with control characters escaped (``_s``), and our own
styling is applied around them (``line``), so ``[bold]`` stays text and an escape sequence
never reaches the terminal.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from worker.domain.text import printable


def table(title: str, columns: list[str]) -> Table:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    return t


_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d+)?([+-]\d{2}:\d{2}|Z)$")


def _s(value: Any) -> Text:
    """A cell: plain text, ISO timestamps shortened to the second (UTC stays implicit)."""
    if value is None:
        return Text("")
    text = str(value)
    match = _ISO.match(text)
    if match:
        zone = match.group(4)
        suffix = "" if zone in ("+00:00", "Z") else zone
        return Text(f"{match.group(1)} {match.group(2)}{suffix}")
    return Text(printable(text))


Part = str | tuple[Any, str] | Text


def line(*parts: Part) -> Text:
    """A line of our words (str), values (``(value, style)``, shown as plain text) and cells."""
    out = Text()
    for part in parts:
        if isinstance(part, tuple):
            value, style = part
            out.append("" if value is None else printable(str(value)), style=style or None)
        else:
            out.append(part)
    return out


def show(console: Console, *parts: Part) -> None:
    console.print(line(*parts), highlight=False)


def _render_pruned(console: Console, story: dict[str, Any]) -> None:
    """A pruned event: what it ended as, from the outcome its emptied row keeps."""
    outcome = story.get("outcome") or {}
    states = ", ".join(f"{state} {n}" for state, n in sorted(outcome.get("entities", {}).items()))
    show(console, ("pruned", "yellow"), " at ", _s(story["pruned_at"]),
         ": its entities, history, calls and coupons were removed (docs/retention.md); "
         "entities were ", (states or "-", ""))
    coupons = outcome.get("coupons", [])
    if coupons:
        t = table("coupons (kept with the pruned event)", ["series", "code", "capillary id"])
        for c in coupons:
            t.add_row(_s(c.get("series_id")), _s(c.get("code")), _s(c.get("capillary_coupon_id")))
        console.print(t)


def render_event(console: Console, story: dict[str, Any]) -> None:
    """An event as support engineers read it: summary, entities, history, coupons."""
    show(console, ("event", "bold"), " ", (story["event_id"], ""), "  state=",
         (story["state"], "bold"), "  customer=", (story.get("customer_key", ""), ""),
         "  received=", _s(story.get("received_at")), "  source=",
         (story.get("source", ""), ""))
    for rejection in story.get("rejections", []):
        show(console, ("rejected", "red"), f" #{rejection['id']} at ",
             _s(rejection["received_at"]), " (", (rejection["source"], ""), "): ",
             (rejection["reason"], ""))
    for rejected_id in story.get("resubmitted_from", []):
        show(console, f"resubmitted from rejected #{rejected_id} "
             f"(coupon-worker rejected show {rejected_id})")
    if story.get("pruned_at"):
        _render_pruned(console, story)
    entities = story.get("entities", [])
    if entities:
        t = table("entities", ["id", "series", "state", "attempts", "last error", "request id",
                               "next attempt"])
        for e in entities:
            parts = (e["last_error_code"], e["last_error_message"])
            error = "" if e["state"] == "issued" else " ".join(str(x) for x in parts if x)
            t.add_row(_s(e["id"]), _s(e["series_id"]), _s(e["state"]), _s(e["attempts"]),
                      _s(error), _s(e["last_request_id"]), _s(e["next_attempt_at"]))
        console.print(t)
        h = table("history", ["at", "entity", "what", "state", "attempt", "error", "message",
                              "request id"])
        for e in entities:
            for item in e["history"]:
                h.add_row(_s(item["at"]), _s(e["id"]), _s(item["kind"]), _s(item["state"]),
                          _s(item["attempt"]), _s(item["error_code"]), _s(item["message"]),
                          _s(item["request_id"]))
        console.print(h)
    coupons = story.get("coupons", [])
    if coupons:
        c = table("coupons", ["series", "code", "discount", "valid till", "issued at", "via"])
        for coupon in coupons:
            discount = " ".join(str(x) for x in (coupon["discount_type"],
                                                 coupon["discount_value"]) if x is not None)
            c.add_row(_s(coupon["series_id"]), _s(coupon["code"]), _s(discount),
                      _s(coupon["valid_till_date_time"] or coupon["valid_till"]),
                      _s(coupon["issued_at"]), _s(coupon["recorded_via"]))
        console.print(c)
        for coupon in coupons:
            _show_warnings(console, coupon)
    else:
        console.print("no coupons issued for this event", highlight=False)


def _show_warnings(console: Console, coupon: dict[str, Any]) -> None:
    """What Capillary's answer warned of when it issued this coupon, one line each."""
    for warning in coupon.get("warnings") or []:
        show(console, ("warning", "yellow"), f" series {coupon['series_id']} coupon ",
             (coupon["code"], ""), ": ", (str(warning), ""))


def render_dead_letters(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no dead letters", highlight=False)
        return
    from worker.domain.model import describe_error

    t = Table(title=f"dead letters ({len(rows)})", title_justify="left")
    for column in ("kind", "id", "event", "customer", "series"):
        t.add_column(column, no_wrap=column in ("kind", "id", "series"), overflow="fold")
    t.add_column("error", overflow="fold")
    t.add_column("tries", no_wrap=True)
    t.add_column("dead since", overflow="fold")
    t.add_column("detail", overflow="fold")
    for r in rows:
        detail = _s(r.get("reason") or r.get("message"))
        t.add_row(_s(r["kind"]), _s(r["id"]), _s(r.get("event_id")), _s(r.get("customer")),
                  _s(r.get("series_id")), _s(describe_error(r.get("error_code"))),
                  _s(r.get("attempts")), _s(r.get("dead_at")), detail)
    console.print(t)


def render_summary(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no dead letters", highlight=False)
        return
    from worker.domain.model import describe_error

    t = table("dead letters by error and series",
              ["error", "series", "entities", "customers", "first", "last"])
    for r in rows:
        t.add_row(_s(describe_error(r["error_code"])), _s(r["series_id"]), _s(r["count"]),
                  _s(r["customers"]), _s(r["first"]), _s(r["last"]))
    console.print(t)


def render_entity(console: Console, e: dict[str, Any]) -> None:
    """One entity's whole story."""
    from worker.domain.model import describe_error

    show(console, ("entity", "bold"), f" {e['id']}  event=", (e["event_id"], ""),
         "  customer=", (e["customer_key"], ""), f"  series={e['series_id']}  state=",
         (e["state"], "bold"), f"  attempts={e['attempts']}  last error=",
         (describe_error(e["last_error_code"]), ""),
         *([("  outcome unknown: reconciles before any re-issue", "yellow")]
           if e.get("needs_reconcile") else []))
    if e.get("dead_reason"):
        show(console, "dead: ", (e["dead_reason"], ""), " (since ", _s(e["dead_at"]), ")")
    h = table("history", ["at", "what", "state", "attempt", "error", "message", "request id",
                          "by"])
    for item in e["history"]:
        h.add_row(_s(item["at"]), _s(item["kind"]), _s(item["state"]), _s(item["attempt"]),
                  _s(item["error_code"]), _s(item["message"]), _s(item["request_id"]),
                  _s(item["worker"]))
    console.print(h)
    if e["calls"]:
        c = table("Capillary calls", ["at", "operation", "status", "ms", "outcome", "error",
                                      "request id"])
        for call in e["calls"]:
            c.add_row(_s(call["started_at"]), _s(call["operation"]), _s(call["http_status"]),
                      _s(f"{call['latency_ms']:.0f}"), _s(call["outcome"]),
                      _s(call["error_code"]),
                      _s(call["request_id"]))
        console.print(c)
    if e.get("coupon"):
        coupon = e["coupon"]
        show(console, "coupon ", (coupon["code"], ""), " valid till ",
             (coupon["valid_till_date_time"] or coupon["valid_till"], ""),
             " (recorded via ", (coupon["recorded_via"], ""), ")")
        for each in e.get("coupons") or [coupon]:
            _show_warnings(console, each)
    if e["operator_actions"]:
        a = table("operator actions", ["at", "action", "operator", "reason", "outcome"])
        for action in e["operator_actions"]:
            a.add_row(_s(action["at"]), _s(action["action"]), _s(action["operator"]),
                      _s(action["reason"]), _s(action["outcome"]))
        console.print(a)


def render_actions(console: Console, results: list[Any], *, dry_run: bool) -> None:
    t = table("dry run: nothing changed" if dry_run else "done",
              ["entity", "event", "customer", "series", "state before", "outcome"])
    for r in results:
        t.add_row(_s(r.entity_id), _s(r.event_id), _s(r.customer), _s(r.series_id),
                  _s(r.state_before), _s(r.outcome))
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


# -- rejected messages ------------------------------------------------------------------------

PAYLOAD_PREVIEW_CHARS = 4000
PAYLOAD_INDENT = "  "


def payload_text(raw: bytes) -> str:
    """Raw bytes as text to look at: undecodable bytes and control characters escaped.

    Line breaks between JSON tokens stay (a pretty-printed payload reads as one), and every
    line is indented, so nothing in a payload can pass for a line of this command's output.
    """
    text = printable(raw.decode("utf-8", errors="backslashreplace"), keep="\n")
    return "\n".join(PAYLOAD_INDENT + part for part in text.split("\n"))


def render_rejected_list(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no rejected messages", highlight=False)
        return
    t = table(f"rejected messages ({len(rows)})",
              ["id", "received", "source", "kind", "event id (as sent)", "bytes", "reason",
               "resubmitted as"])
    for r in rows:
        t.add_row(_s(r["id"]), _s(r["received_at"]), _s(r["source"]), _s(r.get("kind")),
                  _s(r["event_id"]), _s(r["size_bytes"]), _s(r["reason"]),
                  _s(r["resubmitted_event_id"]))
    console.print(t)


def render_rejected(console: Console, story: dict[str, Any], *, full: bool = False) -> None:
    """A rejected message: what was received, why it was refused, what support did."""
    rejected_id = story["id"]
    show(console, ("rejected", "bold"), f" {rejected_id}  source=", (story["source"], ""),
         "  received=", _s(story["received_at"]), f"  size={story['size_bytes']} bytes",
         "  content type=", (story.get("content_type") or "-", ""))
    if story.get("event_id"):
        show(console, "event id (as sent): ", (story["event_id"], ""))
    show(console, ("reason: ", "bold"), (story["reason"], ""))
    kind = story.get("kind", "invalid")
    if kind != "invalid":
        show(console, ("kind: ", "bold"), (kind, "yellow"),
             " (a dead letter: the message was valid as far as anyone knows; our side kept "
             "failing on it)")
    if story.get("resubmitted_at"):
        show(console, "resubmitted as event ", (story["resubmitted_event_id"], "bold"), " at ",
             _s(story["resubmitted_at"]))
    elif kind != "invalid":
        show(console, ("not resubmitted", "yellow"),
             f" (once the cause is fixed: coupon-worker rejected resubmit {rejected_id} "
             "--reason ...; it sends the message as received)")
    else:
        show(console, ("not resubmitted", "yellow"),
             f" (fix it: coupon-worker rejected resubmit {rejected_id} --file FIXED.json "
             "--reason ...)")
    raw: bytes = story["raw"]
    text = payload_text(raw)
    shown = text if full or len(text) <= PAYLOAD_PREVIEW_CHARS else \
        text[:PAYLOAD_PREVIEW_CHARS]
    show(console, ("payload", "bold"),
         f", {len(raw)} bytes (escaped; --save FILE writes them as received)")
    console.print(Text(shown), highlight=False, soft_wrap=True)
    if len(shown) < len(text):
        show(console, f"{PAYLOAD_INDENT}… {len(text) - len(shown)} more characters "
             "(--full shows them all)")
    if story["operator_actions"]:
        a = table("operator actions", ["at", "action", "operator", "os user", "reason",
                                       "outcome"])
        for action in story["operator_actions"]:
            a.add_row(_s(action["at"]), _s(action["action"]), _s(action["operator"]),
                      _s(action["os_user"]), _s(action["reason"]), _s(action["outcome"]))
        console.print(a)


def render_resubmit(console: Console, result: Any, *, dry_run: bool) -> None:
    style = "green" if result.accepted else "red"
    show(console, *(["dry run: nothing changed; "] if dry_run else []),
         f"rejected #{result.rejected_id}: ", (result.outcome, style))
    if result.accepted and not dry_run and result.outcome.startswith("resubmitted"):
        show(console, "follow it with: coupon-worker events show ", (result.event_id, ""))


def render_planned(console: Console, targets: Any, *, verb: str) -> None:
    """The entities a filter found, which a confirmation will act on by id."""
    t = table(f"would {verb} these {len(targets)}",
              ["entity", "event", "customer", "series", "attempts", "last error",
               "read back first"])
    for x in targets:
        t.add_row(_s(x.entity_id), _s(x.event_id), _s(x.customer_key), _s(x.series_id),
                  _s(x.attempts), _s(x.error_code or ""), "yes" if x.needs_reconcile else "")
    console.print(t)


def render_waiting(console: Console, rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    """Waiting entities: why, since when, the next attempt."""
    t = table(f"waiting: {counts.get('retry', 0)} for a retry, "
              f"{counts.get('unknown_outcome', 0)} unknown outcomes settling",
              ["entity", "event", "customer", "series", "waiting for", "since", "next attempt",
               "attempts", "last error"])
    for r in rows:
        why = "unknown outcome" if r["kind"] == "unknown_outcome" else "retry"
        t.add_row(_s(r["id"]), _s(r["event_id"]), _s(r["customer"]), _s(r["series_id"]), why,
                  _s(_when(r["since"])), _s(_when(r["next_attempt_at"]) or "now"),
                  _s(r["attempts"]),
                  _s(" ".join(x for x in (r["error_code"], r["error_message"]) if x)))
    console.print(t)


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""

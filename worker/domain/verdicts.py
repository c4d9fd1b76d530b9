"""The unknown-outcome rule: what an answer from Capillary (or its absence) proves about each
series of a bulk-issue call.

A series is "not issued" only when the answer says so for that series (an entry with errors),
or when the request provably never reached Capillary's application; everything else is
*unknown* (``Verdict.AMBIGUOUS``) and is settled by a read-back before anything is sent again.
The Capillary adapter classifies its answers with these functions; ``worker.domain.policy``
turns each verdict into a decision.
"""

from __future__ import annotations

from worker.domain.model import Verdict, code_meaning

#: Transport failures that happen before the request is written: it never reached Capillary.
#: (``tls_error`` is a refused certificate; any other TLS failure is ``tls_dropped``: unknown.)
NOT_SENT_FAILURES = frozenset({"connection_refused", "connect_timeout", "tls_error"})


def classify_entry_error(code: int | None, message: str = "") -> Verdict:
    """The verdict for one ``errors[]`` entry of a bulk-issue answer, from the domain's table
    of codes (``worker.domain.model.CAPILLARY_CODES``).

    A code we do not know is permanent, so that a person looks at it instead of the worker
    hammering the API.
    """
    return code_meaning(code, message).verdict


def classify_unanswered(status: int) -> Verdict:
    """The verdict for every series of a call whose HTTP answer has no readable entry.

    Only answers that refuse the request before the application acts prove "not issued":
    429 (throttled at the door), 421 and 425 (misdirected, or too early: not processed, try
    again), 401/403/407 (not authenticated, by Capillary or by a proxy on the way), another
    4xx (the request itself is rejected). Any 5xx, with a JSON error body or an HTML page or
    nothing, a 408 (a gateway that gave up waiting, perhaps after forwarding), and a 2xx or
    3xx without readable entries, is unknown: a gateway, a crash after the write or a timeout
    inside Capillary all answer that way after the coupon exists.
    """
    if status in (429, 421, 425):
        return Verdict.RETRYABLE
    if status in (401, 403, 407):
        return Verdict.OUTAGE
    if 400 <= status < 500 and status != 408:
        return Verdict.PERMANENT
    return Verdict.AMBIGUOUS


#: A client setting that fails every call before anything is sent (an unreadable CA bundle).
CLIENT_CONFIG = "client_config"


def classify_transport(failure: str) -> Verdict:
    """The verdict for a call that got no HTTP answer at all.

    A refused connection, a connect timeout or a refused certificate happen before a byte of
    the request is sent; a reset, a read timeout, a broken TLS stream or anything else after
    sending is unknown. A client that cannot send at all is an outage: the circuit pauses
    issuance until the configuration is fixed.
    """
    if failure == CLIENT_CONFIG:
        return Verdict.OUTAGE
    return Verdict.RETRYABLE if failure in NOT_SENT_FAILURES else Verdict.AMBIGUOUS


def counts_toward_circuit(verdict: Verdict, status: int | None) -> bool:
    """Whether a call-level failure says something about Capillary's health.

    Transport failures, 5xx and auth failures do; a 4xx that rejects one request is about that
    request (a bad event), and five bad events in a row must not pause all issuance.
    """
    if verdict is Verdict.OUTAGE:
        return True
    if status is None:
        return verdict in (Verdict.AMBIGUOUS, Verdict.RETRYABLE)
    return status >= 500

"""One exception hierarchy for the whole worker.

Adapters translate library errors (requests, psycopg, kombu) into these, chained with
``raise ... from exc``; services and tasks only ever see these types. The class says what the
caller should do: retry, give up, find out, or stop and call a human.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error raised on purpose by coupon-worker."""


class ConfigurationError(WorkerError):
    """The settings are invalid or incomplete; the process cannot start."""


class EventRejected(WorkerError):
    """An inbound event is malformed; it is recorded as rejected and never retried."""

    def __init__(self, reason: str, *, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id = event_id


class LedgerError(WorkerError):
    """The ledger (PostgreSQL) could not be reached or refused a statement."""


class LedgerUnavailable(LedgerError):
    """The database is down or unreachable; the message must be redelivered later."""


class ClaimLapsed(LedgerUnavailable):
    """A claim's lease lapsed while its task still ran (its renewals failed): nothing may be
    sent under it; the message goes back and the entities return through the sweeper."""


class NotFound(WorkerError):
    """An event or entity asked for by id does not exist."""


class BrokerUnavailable(WorkerError):
    """The message broker refused or did not confirm a publish."""


class CapillaryError(WorkerError):
    """A call to Capillary did not give a usable answer."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id
        self.code = code


class Retryable(CapillaryError):
    """The request was certainly not processed; sending it again is safe."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id, code=code)
        self.retry_after_s = retry_after_s


class Ambiguous(CapillaryError):
    """The request may have been processed and nothing says whether it was.

    Never treated as a failure: the coupon may exist, so the ledger reconciles through the
    read-back APIs before anything is sent again.
    """


class Permanent(CapillaryError):
    """Capillary refused the request for good; sending it again gives the same answer."""


class Outage(CapillaryError):
    """Credentials, configuration or the service itself is broken: pause, do not dead-letter."""


class SelectionRefused(WorkerError, ValueError):
    """What an operator asked to act on cannot be acted on as asked: too many entities (narrow
    the filter), an unreadable list of ids, or a change a resubmission may not make."""

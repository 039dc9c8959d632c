"""The Compute API as the provider uses it: clients built from one set of credentials and
client options, bounded retries of throttled calls, explicit operation waits, and every SDK
failure turned into one of mlcloud's typed errors. google-cloud-compute is imported only here,
and only when a call is made."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mlcloud.providers.base import AuthError, CapacityError, ProviderError, QuotaError
from mlcloud.providers.gce import rules

HOW_TO_CONFIGURE = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
    "to a service-account key file"
)
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
RATE_RETRIES = 4  # a throttled (or 5xx) call is tried this many times in all, backing off
BACKOFF_S = 1.0  # then 2 s, 4 s
OPERATION_TIMEOUT_S = 900.0
CALL_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 150.0
PAGE_SIZE = 500  # GCE's most per list page
# operations.wait "might return after zero seconds", not done: one answered sooner than
# EARLY_S is followed by a pause, so waiting never becomes a busy loop of calls
EARLY_S = 2.0
PAUSES_S = (0.2, 0.5, 1.0, 2.0)  # quick at first, then every 2 s


class Transient(ProviderError):
    """A 5xx Google asks to retry with backoff (backendError): worth a retry after a pause."""


class RateLimited(Transient):
    """429 or rateLimitExceeded."""


class OperationThrottled(ProviderError):
    """An operation GCE accepted, then ended throttled (RATE_LIMIT_EXCEEDED in its errors):
    its request id has had its answer, so only a new request (a new id) can try again."""


class NotFound(ProviderError):
    """The resource does not exist (deleting it again)."""


class AlreadyExists(ProviderError):
    """A resource of that name exists (making it again, on a resumed `up`)."""


def credentials() -> tuple[Any, str | None]:
    """Application Default Credentials and the project they name, or one line on how to set
    them up."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return google.auth.default(scopes=SCOPES)
    except DefaultCredentialsError as e:
        why = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)  # not a tuple's repr
        raise AuthError(
            f"no usable Google Cloud credentials ({_short(why)}); {HOW_TO_CONFIGURE}"
        ) from None


class Api:
    """Compute clients for one project and endpoint, sharing credentials and options."""

    def __init__(self, project: str, endpoint: str | None, creds: Any) -> None:
        self.project = project
        self.endpoint = endpoint
        self._creds = creds
        self._clients: dict[str, Any] = {}

    def client(self, kind: str) -> Any:
        """instances, zone_operations, global_operations, firewalls, images or zones: all
        with this endpoint, so no call (an operation poll included) goes elsewhere."""
        if kind not in self._clients:
            from google.api_core.client_options import ClientOptions
            from google.cloud import compute_v1

            cls = {
                "instances": compute_v1.InstancesClient,
                "zone_operations": compute_v1.ZoneOperationsClient,
                "global_operations": compute_v1.GlobalOperationsClient,
                "firewalls": compute_v1.FirewallsClient,
                "images": compute_v1.ImagesClient,
                "zones": compute_v1.ZonesClient,
            }[kind]
            options = ClientOptions(api_endpoint=self.endpoint) if self.endpoint else None
            with errors("client", None):
                self._clients[kind] = cls(credentials=self._creds, client_options=options)
        return self._clients[kind]

    def call(self, kind: str, method: str, where: str | None, **request: Any) -> Any:
        """One call, retried with backoff while GCE throttles or answers 5xx (a request id in
        `request` makes a retried insert or delete safe)."""
        for attempt in range(RATE_RETRIES):
            try:
                with errors(f"{kind} {method}", where):
                    fn = getattr(self.client(kind), method)
                    # an operation's wait answers within two minutes, done or not
                    timeout = WAIT_TIMEOUT_S if method == "wait" else CALL_TIMEOUT_S
                    return fn(request=request, timeout=timeout)
            except Transient:
                if attempt == RATE_RETRIES - 1:
                    raise
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def retry_throttled(self, make: Callable[[], Any]) -> Any:
        """make() (a request and its operation's wait) again while the operation ends throttled
        (GCE accepted the request, then refused the work: RATE_LIMIT_EXCEEDED), backing off;
        `make` must send each try as a new request (a new request id: the old one's answer is
        the throttled operation)."""
        for attempt in range(RATE_RETRIES):
            try:
                return make()
            except OperationThrottled:
                if attempt == RATE_RETRIES - 1:
                    raise
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def wait(self, op: Any, zone: str | None, region: str | None) -> None:
        """Wait for an operation with our own operations client (the SDK's `result()` polls a
        default endpoint); its errors become the typed ones: capacity in `zone`, quota in
        `region`."""
        from google.cloud import compute_v1

        done = compute_v1.Operation.Status.DONE
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        pauses = iter(PAUSES_S)
        while op.status != done:
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"gce: operation {op.name} not done after "
                    f"{OPERATION_TIMEOUT_S:.0f} s; check it in the console"
                )
            started = time.monotonic()
            if zone:
                op = self.call(
                    "zone_operations",
                    "wait",
                    zone,
                    project=self.project,
                    zone=zone,
                    operation=op.name,
                )
            else:
                op = self.call(
                    "global_operations", "wait", None, project=self.project, operation=op.name
                )
            if op.status != done and time.monotonic() - started < EARLY_S:
                time.sleep(next(pauses, PAUSES_S[-1]))
        failures = [(e.code, e.message) for e in op.error.errors] if op.error else []
        if failures:
            error = typed(failures, zone, region, f"gce: {op.operation_type or 'operation'}")
            raise OperationThrottled(str(error)) if isinstance(error, RateLimited) else error

    def paged(self, kind: str, method: str, **request: Any) -> Iterator[Any]:
        """Every item of a list call, page by page (each page is one call)."""
        request = {**request, "max_results": PAGE_SIZE}
        while True:
            page = self.call(kind, method, None, **request)
            if method == "aggregated_list":
                for scope, scoped in page.items.items():
                    for item in scoped.instances:
                        yield scope, item
            else:
                yield from page.items
            if not page.next_page_token:
                return
            request["page_token"] = page.next_page_token


def typed(
    failures: list[tuple[str, str]], zone: str | None, region: str | None, what: str
) -> ProviderError:
    """The error a list of (code, message) stands for, in one line."""
    text = "; ".join(f"{c}: {_short(m)}" for c, m in failures)
    kinds = {rules.classify(c, m) for c, m in failures}
    if "quota" in kinds:
        return QuotaError(
            region or zone or "",
            f"GCE quota in {region or zone}: {text}; ask "
            "for more in the console (IAM & Admin > Quotas) or pick another region",
        )
    if "capacity" in kinds:
        return CapacityError(zone or "", f"GCE {zone}: {text}")
    if "rate" in kinds:
        return RateLimited(f"{what}: throttled: {text}")
    if "exists" in kinds:
        return AlreadyExists(f"{what}: {text}")
    return ProviderError(f"{what} failed in {zone or region or 'global'}: {text}")


@contextmanager
def errors(operation: str, where: str | None) -> Iterator[None]:
    """google-api-core and google-auth errors as mlcloud's typed ones, one line each."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as aexc

    place = f" in {where}" if where else ""
    debug = "--debug for details"
    try:
        yield
    except aexc.DefaultCredentialsError as e:
        raise AuthError(
            f"no usable Google Cloud credentials ({_short(str(e))}); {HOW_TO_CONFIGURE}"
        ) from e
    except aexc.RefreshError as e:
        raise AuthError(
            f"Google refused the credentials ({_short(str(e))}); {HOW_TO_CONFIGURE}"
        ) from e
    except gexc.GoogleAPICallError as e:
        codes = [x.get("reason", "") for x in e.errors if isinstance(x, dict)]
        codes += [e.reason] if getattr(e, "reason", None) else []
        # api-core puts "METHOD URL: " before Google's message
        full = re.sub(r"^[A-Z]+ \S+: ", "", e.message or str(e))
        message = _short(full)
        if isinstance(e, gexc.TooManyRequests):
            codes.append("rateLimitExceeded")
        failures = [(c, full) for c in codes] or [("", full)]
        kind = {rules.classify(c, m) for c, m in failures}
        if kind & {"quota", "capacity", "rate"}:
            region = rules.region_of(where) if where else None
            raise typed(failures, where, region, f"gce: {operation}") from e
        if isinstance(e, gexc.Conflict):
            raise AlreadyExists(f"gce: {operation}{place}: {message}") from e
        if isinstance(e, gexc.NotFound):
            raise NotFound(f"gce: {operation}{place}: {message}") from e
        if isinstance(e, gexc.Unauthorized):  # 401; gRPC's Unauthenticated is one
            raise AuthError(
                f"Google refused the credentials ({message}); {HOW_TO_CONFIGURE}"
            ) from e
        if {"accessNotConfigured", "SERVICE_DISABLED"} & set(codes):
            raise AuthError(
                f"gce: the Compute Engine API is not enabled for the project ({message}); "
                "run `gcloud services enable compute.googleapis.com`"
            ) from e
        if isinstance(e, gexc.PermissionDenied):
            raise AuthError(
                f"gce: {operation}{place}: permission denied ({message}); give "
                "the credentials' account the Compute Admin role"
            ) from e
        failed = f"gce: {operation}{place} failed: {message}; {debug}"
        if isinstance(e, gexc.ServerError):  # 500, 502, 503, 504
            raise Transient(failed) from e
        raise ProviderError(failed) from e
    except aexc.TransportError as e:
        raise ProviderError(
            f"gce: {operation}{place}: cannot reach Google ({_short(str(e))});"
            f" check the network; {debug}"
        ) from e
    except OSError as e:  # requests' ConnectionError and timeouts are OSErrors
        raise ProviderError(
            f"gce: {operation}{place}: cannot reach the Compute API "
            f"({_short(str(e))}); check the network or "
            f"MLCLOUD_GCE_API_ENDPOINT; {debug}"
        ) from e


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."

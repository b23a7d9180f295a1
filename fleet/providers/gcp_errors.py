"""Compute Engine errors -> `fleet.errors`: the one place where GCP codes are read.

Codes come two ways: as HTTP errors raised by the client (`errors[].reason`, e.g.
`quotaExceeded`, `rateLimitExceeded`) and as errors inside a finished zone operation
(`error.errors[].code`, e.g. `ZONE_RESOURCE_POOL_EXHAUSTED`, `QUOTA_EXCEEDED`).
Messages are kept short and never carry credentials (the client's errors hold none).
A 5xx, a read timeout or a reset connection is transient (retried); a 503 is a capacity
error only where GCE means one: an insert whose zone ran out of resources
(`classify_insert`), never a `list()` or a delete.
"""

from __future__ import annotations

import re
from typing import Any

from fleet.errors import (
    CapacityError,
    CredentialsError,
    FleetError,
    ProviderError,
    QuotaError,
    RateLimitError,
    TransientError,
)

CAPACITY_CODES = {
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "INSUFFICIENTCAPACITY",
    "UNSUPPORTED_OPERATION",
    "RESOURCE_NOT_READY",
    "RESOURCENOTREADY",
    "RESOURCE_OPERATION_RATE_EXCEEDED",
}
QUOTA_CODES = {"QUOTA_EXCEEDED", "QUOTAEXCEEDED"}
RATE_CODES = {"RATELIMITEXCEEDED", "USERRATELIMITEXCEEDED"}
_QUOTA_NAME = re.compile(r"Quota '([A-Z0-9_]+)'")
_CREDENTIAL_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
    "to a service account key file"
)


def _short(message: str) -> str:
    return message.strip().splitlines()[0][:400] if message.strip() else "unknown error"


def quota_error(message: str) -> QuotaError:
    found = _QUOTA_NAME.search(message)
    quota = found.group(1) if found else None
    if quota == "GPUS_ALL_REGIONS":
        return QuotaError(
            f"GCP quota GPUS_ALL_REGIONS exhausted: every region is out of GPUs for this project ({_short(message)})",
            quota=quota,
            hint="request a higher GPUS_ALL_REGIONS quota (IAM & Admin > Quotas); other zones will not help",
        )
    return QuotaError(
        f"GCP quota {quota or '(unnamed)'} exhausted: {_short(message)}",
        quota=quota,
        hint="request a quota increase (IAM & Admin > Quotas) or use zones of another region",
    )


def from_code(code: str, message: str, *, zone: str | None = None) -> FleetError:
    key = code.upper()
    if key in CAPACITY_CODES:
        return CapacityError(f"no capacity in {zone or 'the zone'}: {_short(message)}", zone=zone)
    if key in QUOTA_CODES or "quota" in message.lower() and "exceeded" in message.lower():
        return quota_error(message)
    if key in RATE_CODES:
        return RateLimitError(f"GCP API rate limit: {_short(message)}")
    return ProviderError(f"GCP error {code}: {_short(message)}")


_EXHAUSTED = ("resource", "exhausted", "capacity", "enough resources")


def classify_insert(exc: BaseException) -> FleetError | None:
    """`classify` for an instance insert: a 503 that says the zone has no resources left
    is a capacity error (try the next zone); any other 503 is transient."""
    mapped = classify(exc)
    if isinstance(mapped, TransientError) and getattr(exc, "code", None) == 503:
        message = str(getattr(exc, "message", "") or "").lower()
        if any(word in message for word in _EXHAUSTED):
            return CapacityError(f"GCP reports no capacity: {_short(str(getattr(exc, 'message', '')))}")
    return mapped


def classify(exc: BaseException) -> FleetError | None:
    """Map a google-cloud-compute / google-auth exception; None for anything else."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(exc, requests.exceptions.Timeout | requests.exceptions.ConnectionError):
        return TransientError(f"the Compute Engine API did not answer ({type(exc).__name__})")
    if isinstance(exc, auth_exc.TransportError):
        return TransientError(f"the Google token endpoint did not answer ({type(exc).__name__})")
    if isinstance(exc, auth_exc.DefaultCredentialsError | auth_exc.RefreshError):
        return CredentialsError(
            "Google Cloud credentials were refused or could not be refreshed", hint=_CREDENTIAL_HINT
        )
    if not isinstance(exc, gexc.GoogleAPICallError):
        return None
    reasons = [str(e.get("reason", "")) for e in (exc.errors or []) if isinstance(e, dict)]
    message = str(exc.message or "")
    for reason in reasons:
        mapped = from_code(reason, message)
        if not (type(mapped) is ProviderError):
            return mapped
    if isinstance(exc, gexc.TooManyRequests):
        return RateLimitError(f"GCP API rate limit: {_short(message)}")
    if isinstance(exc, gexc.ServerError | gexc.DeadlineExceeded):  # 500, 502, 503, 504
        return TransientError(f"GCP API error {exc.code}: {_short(message)}")
    if isinstance(exc, gexc.Unauthorized):
        return CredentialsError("Google Cloud refused the credentials", hint=_CREDENTIAL_HINT)
    if isinstance(exc, gexc.Forbidden):
        return ProviderError(
            f"GCP permission denied: {_short(message)}",
            hint="the account needs roles/compute.instanceAdmin.v1 and compute.securityAdmin",
        )
    return ProviderError(f"GCP API error {exc.code}: {_short(message)}")


def operation_error(operation: Any, *, zone: str | None) -> FleetError | None:
    """The error of a finished operation, mapped; None when it succeeded."""
    errors = list(operation.error.errors) if operation.error else []
    if not errors:
        return None
    mapped = [from_code(e.code, e.message, zone=zone) for e in errors]
    for kind in (QuotaError, CapacityError, RateLimitError):
        for error in mapped:
            if isinstance(error, kind):
                return error
    return mapped[0]

"""EC2 errors -> `fleet.errors`: the one place where AWS error codes are read.

Capacity codes move creation to the next zone/subnet, limit codes stop it with a clear
message, throttling and transient faults (5xx, `InternalError`, `Unavailable`, read
timeouts, reset connections) back off and retry (`fleet.providers.retry`), after
botocore's own standard-mode retries. Messages carry the code and AWS's text, never credentials
(botocore's errors hold none; we do not add request parameters).
"""

from __future__ import annotations

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
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "UnfulfillableCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
}
QUOTA_CODES = {"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotFleetRequestCountExceeded"}
RATE_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"}
TRANSIENT_CODES = {
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
}
AUTH_CODES = {
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "UnrecognizedClientException",
}
_CREDENTIAL_HINT = (
    "run `aws configure` or `aws sso login`, set `aws.profile` / AWS_PROFILE, "
    "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)


def _short(text: str) -> str:
    return text.strip().splitlines()[0][:400] if text.strip() else ""


def from_code(code: str, message: str, *, where: str | None = None) -> FleetError:
    text = f"{code}: {_short(message)}" if message else code
    if code in CAPACITY_CODES:
        return CapacityError(f"no capacity{f' in {where}' if where else ''} ({text})", zone=where)
    if code in QUOTA_CODES:
        hint = (
            "request a higher 'Running On-Demand/Spot ... instances' vCPU quota in Service Quotas"
            if code == "VcpuLimitExceeded"
            else "request a limit increase in Service Quotas"
        )
        return QuotaError(f"AWS limit reached: {text}", quota=code, hint=hint)
    if code in RATE_CODES:
        return RateLimitError(f"AWS API throttled: {text}")
    if code in TRANSIENT_CODES:
        return TransientError(f"EC2 API failed transiently: {text}")
    if code in AUTH_CODES:
        return CredentialsError(f"AWS refused the credentials ({code})", hint=_CREDENTIAL_HINT)
    if code == "UnauthorizedOperation":
        return ProviderError(f"AWS permission denied ({code})", hint="the credentials need EC2 permissions")
    return ProviderError(f"AWS error {text}")


def classify(exc: BaseException) -> FleetError | None:
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        mapped = from_code(str(error.get("Code", "Unknown")), str(error.get("Message", "")))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if type(mapped) is ProviderError and status >= 500:
            return TransientError(f"EC2 API answered HTTP {status}: {mapped.message.removeprefix('AWS error ')}")
        return mapped
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return CredentialsError("no AWS credentials found in the default chain", hint=_CREDENTIAL_HINT)
    # Read timeouts, resets, a proxy or endpoint that did not answer: HTTPClientError
    # covers ReadTimeoutError, ConnectTimeoutError, ConnectionClosedError, ProxyConnectionError.
    if isinstance(exc, bexc.EndpointConnectionError | bexc.HTTPClientError):
        return TransientError(f"cannot reach the EC2 API ({type(exc).__name__})")
    return None

"""The one error hierarchy of `fleet`.

Every error a user can see is a `FleetError`. Subclasses say what the user can do
about it; the CLI turns them into a message and an exit code (2 for bad input, 1 for a
failed operation) and never prints a traceback for them. Cloud error codes are mapped
to these classes inside the providers and nowhere else.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error `fleet` reports to a user."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class SpecError(FleetError):
    """A spec file (fleet.yaml, job.yaml) is invalid. Nothing was started."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.file = file
        self.line = line
        self.column = column
        self.field = field

    def __str__(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: "
        if self.field:
            text += f"{self.field}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class SpecErrors(SpecError):
    """Several spec errors found in one pass; all of them are reported."""

    def __init__(self, errors: list[SpecError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class UsageError(FleetError):
    """The command line is wrong (unknown node, missing argument...)."""

    exit_code = 2


class DependencyError(FleetError):
    """A program `fleet` needs on this machine is missing (sshd, sshfs...)."""


class StateError(FleetError):
    """The fleet's local record cannot be read or written."""


class ProviderError(FleetError):
    """A cloud or local provider refused or failed an operation."""


class CapacityError(ProviderError):
    """No capacity for this request in this zone: try the next zone."""

    def __init__(self, message: str, *, zone: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.zone = zone


class QuotaError(ProviderError):
    """A quota or account limit is exhausted: retrying will not help."""

    def __init__(self, message: str, *, quota: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.quota = quota


class RateLimitError(ProviderError):
    """The API throttled us: back off and retry."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientError(ProviderError):
    """A fault that usually passes: a 5xx, an API that is unavailable, a read timeout,
    a reset connection. Retried with a budget; what is left after it is a ProviderError."""


class CredentialsError(ProviderError):
    """No usable credentials were found in the standard chain."""


class SSHError(FleetError):
    """An SSH connection or command failed on one node."""

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.node = node


class HostKeyError(SSHError):
    """A node presented a host key different from the pinned one. Refused."""


class AuthError(SSHError):
    """The node refused the fleet's key."""


class CommandTimeout(SSHError):
    """A remote command ran past its timeout."""


class JobError(FleetError):
    """A job could not be started or could not finish."""

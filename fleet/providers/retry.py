"""Back off and retry what passes: throttling (`RateLimitError`) and transient faults
(`TransientError`: 5xx, unavailable, read timeouts, reset connections), nothing else.

The providers map their SDK's exceptions to `fleet.errors` first (a `classify`
function), then this loop decides: a retryable error sleeps (exponential, capped, with
full jitter on the upper half, or the server's retry-after) and tries again, within a
budget of attempts and of seconds; any other error goes up at once. After the budget the
last error goes up as a `ProviderError` that says how long it was tried, never the SDK's
exception. The sleep is injected so that tests do not wait.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from fleet.errors import FleetError, ProviderError, RateLimitError, TransientError

T = TypeVar("T")
Sleep = Callable[[float], None]
Retryable = RateLimitError | TransientError


def with_backoff(
    call: Callable[[], T],
    *,
    classify: Callable[[BaseException], FleetError | None],
    sleep: Sleep,
    attempts: int = 8,
    first_delay: float = 1.0,
    max_delay: float = 32.0,
    budget_s: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
    cancel: threading.Event | None = None,
    on_retry: Callable[[FleetError, float], None] | None = None,
) -> T:
    """Run `call`; retry it after a delay while it is throttled or fails transiently, at
    most `attempts` times and not past `budget_s` seconds of waiting, nor once `cancel`
    is set (a real sleep then ends at once). Errors `classify` maps are raised as the
    mapped `FleetError` (chained)."""
    if cancel is not None and sleep is time.sleep:
        sleep = cancel.wait
    delay = first_delay
    waited = 0.0
    started = clock()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            mapped = exc if isinstance(exc, FleetError) else classify(exc)
            if mapped is None:
                raise
            if not isinstance(mapped, Retryable):
                if mapped is exc:
                    raise
                raise mapped from exc
            wait = (
                mapped.retry_after
                if isinstance(mapped, RateLimitError) and mapped.retry_after is not None
                else delay * (0.5 + random.random() / 2)
            )
            if attempt == attempts or waited + wait > budget_s or (cancel is not None and cancel.is_set()):
                raise gave_up(mapped, attempt, clock() - started) from exc
            if on_retry is not None:
                on_retry(mapped, wait)
            sleep(wait)
            waited += wait
            if cancel is not None and cancel.is_set():
                raise gave_up(mapped, attempt, clock() - started) from exc
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def gave_up(error: FleetError, attempts: int, seconds: float) -> ProviderError:
    """The error that ends a retried call: what kept failing, how often, for how long."""
    return ProviderError(
        f"{error.message} (still failing after {attempts} attempt(s) over {seconds:.0f} s)",
        hint=error.hint or "the cloud API is failing; try again later",
    )

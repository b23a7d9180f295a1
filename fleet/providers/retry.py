"""Back off and retry when a cloud API throttles us (`RateLimitError`), nothing else.

The providers map their SDK's exceptions to `fleet.errors` first (a `classify`
function), then this loop decides: a rate limit sleeps (exponential, capped, with
jitter, or the server's retry-after) and tries again; any other error goes up at once.
The sleep is injected so that tests do not wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from fleet.errors import FleetError, RateLimitError

T = TypeVar("T")
Sleep = Callable[[float], None]


def with_backoff(
    call: Callable[[], T],
    *,
    classify: Callable[[BaseException], FleetError | None],
    sleep: Sleep,
    attempts: int = 8,
    first_delay: float = 1.0,
    max_delay: float = 32.0,
    on_retry: Callable[[RateLimitError, float], None] | None = None,
) -> T:
    """Run `call`; retry it after a delay while it is rate limited, at most `attempts` times.
    Errors `classify` maps are raised as the mapped `FleetError` (chained)."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            mapped = exc if isinstance(exc, FleetError) else classify(exc)
            if mapped is None:
                raise
            if not isinstance(mapped, RateLimitError) or attempt == attempts:
                if mapped is exc:
                    raise
                raise mapped from exc
            wait = (
                mapped.retry_after if mapped.retry_after is not None else delay * (0.5 + random.random() / 2)
            )
            if on_retry is not None:
                on_retry(mapped, wait)
            sleep(wait)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")

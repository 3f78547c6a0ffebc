"""File descriptors: enough of them for the configured caps, and running out is ours.

Every WebSocket connection, gRPC connection and upstream request holds a descriptor. The
soft ``RLIMIT_NOFILE`` is often 1024 while ``VOXRELAY_MAX_CONNECTIONS`` alone is 4096, so
:func:`raise_descriptor_limit` raises it toward the hard limit at start-up and says so
when even that is below what the caps need. When descriptors run out anyway, connecting
upstream fails with ``EMFILE`` (this process) or ``ENFILE`` (the whole system): a
shortage here, not a sign of the upstream's health, so :func:`out_of_descriptors`
lets the providers call it :class:`~service.errors.Unavailable` and the breaker ignore it.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from .errors import Unavailable
from .settings import Settings

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "DescriptorLimit",
    "descriptors_needed",
    "out_of_descriptors",
    "raise_descriptor_limit",
    "shortage_error",
]

log = logging.getLogger(__name__)

#: Descriptors the process holds whatever its traffic: listeners, the loop, logs,
#: libraries, the embedded engine, metrics scrapes.
BASE_DESCRIPTORS = 256
#: The errors of a descriptor shortage: this process's (EMFILE), the system's (ENFILE).
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
#: How far down an exception's cause chain a shortage is looked for.
MAX_CHAIN = 16


def descriptors_needed(settings: Settings) -> int | None:
    """Return how many descriptors the caps allow at once, or None when a cap is off.

    Each WebSocket connection holds one; each stream may hold its caller's gRPC
    connection, one chat request and one speech request per segment in flight.
    """
    if not settings.max_connections or not settings.max_streams:
        return None
    per_stream = 2 + settings.lookahead_segments
    return settings.max_connections + settings.max_streams * per_stream + BASE_DESCRIPTORS


@dataclass(frozen=True, slots=True)
class DescriptorLimit:
    """The soft limit before and after start-up, the hard limit, and what the caps need."""

    before: int
    soft: int
    hard: int
    needed: int | None

    @property
    def enough(self) -> bool:
        return self.needed is None or self.soft >= self.needed


def raise_descriptor_limit(settings: Settings) -> DescriptorLimit | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; warn if it is below the caps.

    Return what was found and done (None where the platform has no such limit).
    """
    if resource is None:  # pragma: no cover
        return None
    needed = descriptors_needed(settings)
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = before
    # An unlimited hard limit cannot be the soft one everywhere (macOS caps it): then
    # ask for what the caps need.
    target = hard if hard != resource.RLIM_INFINITY else max(before, needed or before)
    if target > before:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning(
                "cannot raise the open-file limit: %s",
                exc,
                extra={"event": "fd_limit", "soft": before, "hard": hard},
            )
    limit = DescriptorLimit(before=before, soft=soft, hard=hard, needed=needed)
    if not limit.enough:
        log.warning(
            "the open-file limit (%d) is below what the caps need (%d): raise the hard"
            " limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) or lower"
            " VOXRELAY_MAX_CONNECTIONS / VOXRELAY_MAX_STREAMS",
            soft,
            needed,
            extra={"event": "fd_limit", "soft": soft, "hard": hard, "needed": needed},
        )
    elif soft != before:
        log.info(
            "raised the open-file limit from %d to %d",
            before,
            soft,
            extra={"event": "fd_limit", "soft": soft, "hard": hard, "needed": needed},
        )
    return limit


def out_of_descriptors(exc: BaseException) -> bool:
    """Say whether *exc*, or an error it was raised from, is a descriptor shortage."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and len(seen) < MAX_CHAIN and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in SHORTAGE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def shortage_error(stage: str) -> Unavailable:
    """Return the error for a call to *stage*'s upstream that found no descriptor free."""
    return Unavailable(
        f"voxrelay has no file descriptor free to reach the {stage} upstream: retry shortly",
        retry_after_s=1.0,
    )

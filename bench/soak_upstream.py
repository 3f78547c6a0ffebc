"""The soak run's upstream: the fake OpenAI server, faulting only where a request asks it to.

A chat request whose last user message holds ``[[fault:KIND]]`` (one of :data:`FAULTS`) is
answered with that fault: a 5xx, a reset before or after some tokens, a stall, a slow first
byte, a malformed frame. ``[[long]]`` asks for a long reply. Every other request is served
normally, so the soak's normal clients share the upstream with the attack and see it healthy.

One fault at a time, and only after :data:`HEALTHY_BETWEEN_FAULTS` chat requests were answered
whole since the last one ended: voxrelay's breaker opens after five consecutive failed calls
(``VOXRELAY_BREAKER_FAILURES``), and an attack that asks for faults must not be what opens the
chat breaker for the normal clients. A failure is recorded when voxrelay notices it, a stall's
only at its timeout, so counting faults in a row as they are served was not enough: in a
12-minute run the chat breaker opened three times. A marked request that comes too soon (or
a retry of a faulted one) is served healthy.

Run ``python -m bench.soak_upstream --port 0``; the start-up line is the fake's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fakes.openai_upstream import (
    DEFAULT_REPLY,
    FakeOpenAI,
    Fault,
    hang,
    malformed,
    reset_after,
    serve_from_command_line,
    slow_first_byte,
    status,
)

__all__ = ["FAULTS", "HEALTHY_BETWEEN_FAULTS", "LONG_REPLY", "SoakUpstream", "main", "marker"]

#: what ``[[fault:KIND]]`` asks for.
FAULTS: Mapping[str, Callable[[], Fault]] = {
    "500": lambda: status(500),
    "503": lambda: status(503, retry_after=1),
    "reset0": lambda: reset_after(0),
    "reset": lambda: reset_after(5),
    "stall": hang,
    "slow": lambda: slow_first_byte(4.0),
    "malformed": malformed,
}
#: chat requests answered whole between two faults.
HEALTHY_BETWEEN_FAULTS = 2

LONG_REPLY = " ".join(
    f"Point {i}: the relay keeps speaking while the listener keeps listening, "
    "sentence after sentence, with no end in sight."
    for i in range(1, 60)
)

_MARK = re.compile(r"\[\[(fault:(?P<fault>\w+)|long)\]\]")


def marker(text: str) -> re.Match[str] | None:
    """Return the soak marker in *text*, if any."""
    return _MARK.search(text)


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _reply(messages: Sequence[Mapping[str, Any]]) -> str:
    found = marker(_last_user_text(messages))
    return LONG_REPLY if found is not None and found.group(0) == "[[long]]" else DEFAULT_REPLY


class SoakUpstream(FakeOpenAI):
    """The fake upstream with faults chosen by the request itself."""

    def __init__(self, **options: Any) -> None:
        options["reply"] = _reply
        super().__init__(**options)
        self.fault_open = False
        self.healthy_since_fault = HEALTHY_BETWEEN_FAULTS

    async def _respond(self, conn: Any, request: Any, record: Any) -> bool:
        if record.path != "/v1/chat/completions" or not isinstance(record.body, dict):
            return await super()._respond(conn, request, record)
        messages = record.body.get("messages")
        found = marker(_last_user_text(messages) if isinstance(messages, list) else "")
        make = FAULTS.get(found.group("fault") or "") if found is not None else None
        due = not self.fault_open and self.healthy_since_fault >= HEALTHY_BETWEEN_FAULTS
        if make is not None and due:
            self.fault_open, self.healthy_since_fault = True, 0
            # Taken by this very request: nothing awaits between here and the take.
            self.chat_faults.append(make())
            try:
                return await super()._respond(conn, request, record)
            finally:
                self.fault_open = False
        whole = await super()._respond(conn, request, record)
        if whole:
            self.healthy_since_fault += 1
        return whole


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the soak's upstream until Ctrl-C."""
    serve_from_command_line(
        SoakUpstream,
        argv,
        prog="python -m bench.soak_upstream",
        port=8000,
        title="fake OpenAI upstream",
    )


if __name__ == "__main__":
    main()

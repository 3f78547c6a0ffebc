"""The soak run's upstream: the fake OpenAI server, faulting only where a request asks it to.

A chat request whose last user message holds ``[[fault:KIND]]`` (one of :data:`FAULTS`) is
answered with that fault: a 5xx, a reset before or after some tokens, a stall, a slow first
byte, a malformed frame. ``[[long]]`` asks for a long reply. Every other request is served
normally, so the soak's normal clients share the upstream with the attack and see it healthy.

Faults in a row (a retry of a faulted call is asked the same fault) are capped below voxrelay's
breaker threshold (``VOXRELAY_BREAKER_FAILURES``, 5 by default): the breaker counts consecutive
failed calls, and an attack that asks for faults must not be what opens the chat breaker for
everyone. Past the cap, marked requests are served healthy until one is.

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

__all__ = ["FAULTS", "LONG_REPLY", "MAX_FAULTS_IN_A_ROW", "SoakUpstream", "main", "marker"]

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
#: fewer than voxrelay's default breaker threshold (5).
MAX_FAULTS_IN_A_ROW = 3

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
        self.faults_in_a_row = 0

    async def _respond(self, conn: Any, request: Any, record: Any) -> bool:
        if record.path == "/v1/chat/completions" and isinstance(record.body, dict):
            messages = record.body.get("messages")
            text = _last_user_text(messages) if isinstance(messages, list) else ""
            found = marker(text)
            make = FAULTS.get(found.group("fault") or "") if found is not None else None
            if make is not None and self.faults_in_a_row < MAX_FAULTS_IN_A_ROW:
                self.faults_in_a_row += 1
                # Taken by this very request: nothing awaits between here and the take.
                self.chat_faults.append(make())
            else:
                self.faults_in_a_row = 0
        return await super()._respond(conn, request, record)


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

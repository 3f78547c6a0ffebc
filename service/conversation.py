"""A connection's conversation memory: its last turns, offered as the next request's history."""

from __future__ import annotations

import collections

from .model import ChatMessage
from .planner import MAX_HISTORY

__all__ = ["Conversation"]


class Conversation:
    """The completed turns of one conversation, newest last, within what a request may carry.

    A :meth:`reset` starts a new epoch: a turn that was in flight when it came is not
    remembered either.
    """

    def __init__(self, *, max_turns: int, history_chars: int) -> None:
        self._turns: collections.deque[tuple[str, str]] = collections.deque(maxlen=max_turns)
        self._history_chars = history_chars
        self.epoch = 0

    def history(self) -> tuple[ChatMessage, ...]:
        """Return the remembered turns as messages: the newest that fit the budget."""
        budget = self._history_chars
        turns: list[tuple[str, str]] = []
        for user, reply in reversed(self._turns):
            cost = len(user) + len(reply)
            if len(turns) >= MAX_HISTORY // 2 or cost > budget:
                break
            budget -= cost
            turns.append((user, reply))
        return tuple(
            message
            for user, reply in reversed(turns)
            for message in (ChatMessage("user", user), ChatMessage("assistant", reply))
        )

    def remember(self, user: str, reply: str, *, epoch: int) -> None:
        """Keep a finished turn, unless the conversation was reset since *epoch*."""
        if epoch == self.epoch:
            self._turns.append((user, reply))

    def reset(self) -> None:
        """Forget every turn, and the turn in flight."""
        self._turns.clear()
        self.epoch += 1

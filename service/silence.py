"""Trim the silence engines put around speech, as the PCM streams past (sans-I/O).

Engines start each segment with silence of their own and end it with more, so two
segments spoken one after the other are separated by the earlier one's trailing silence
plus the later one's leading silence, and a stream's first sound comes later than its
first byte. A :class:`SilenceTrimmer` makes each segment start with at most ``lead_ms`` of
silence and end with exactly one pause of ``pause_ms``, whatever the engine sent.
"""

from __future__ import annotations

import array
import sys

__all__ = ["SilenceTrimmer"]

#: Audio is judged in windows of this length ...
WINDOW_MS = 10
#: ... and a window whose peak stays under this (-45 dBFS) is silence.
SILENCE_PEAK = 184
#: Silence kept in front of a segment's first sound, so its onset is not clipped. With
#: the window that sound starts in, a segment starts with at most 20 ms under the peak
#: test: room under SPEC's 30 ms for a test that judges windows by their RMS instead.
LEAD_MS = 10
#: Silence inside a segment held back at most (beyond its pause) before it is let go.
MAX_HOLD_MS = 2000


#: Maps a sample's high byte to 0 when the sample is under 256 in size, else to 1.
_QUIET_HIGH = bytes(0 if b in (0x00, 0xFF) else 1 for b in range(256))


def _silent(window: bytes) -> bool:
    """Whether no sample of *window* (s16le) reaches :data:`SILENCE_PEAK`."""
    # A sample under 256 in size has a high byte of 0x00 or 0xFF: most of speech is
    # told apart by that alone, in C, before any sample is looked at.
    if window[1::2].translate(None, b"\x00\xff"):
        return False
    samples = array.array("h", window)
    if sys.byteorder == "big":
        samples.byteswap()
    return max(samples) < SILENCE_PEAK and min(samples) > -SILENCE_PEAK


class SilenceTrimmer:
    """Trim one stream's segments: leading silence to ``lead_ms``, trailing to one pause.

    Call :meth:`begin` when a segment starts, :meth:`feed` with its PCM (s16le mono) as it
    comes and :meth:`end` when it is over; each returns the PCM to send now. A silence
    inside a segment is sent as it comes up to ``pause_ms``; any more of it is held until
    speech follows (then sent whole) or the segment ends (then dropped), never more than
    ``max_hold_ms``. A segment that is silence throughout sends nothing.
    """

    def __init__(
        self,
        sample_rate: int,
        *,
        pause_ms: int,
        lead_ms: int = LEAD_MS,
        max_hold_ms: int = MAX_HOLD_MS,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample rate must be positive: {sample_rate}")
        self._rate = sample_rate
        self._window = max(1, sample_rate * WINDOW_MS // 1000) * 2
        self._pause = sample_rate * pause_ms // 1000 * 2
        self._lead = sample_rate * lead_ms // 1000 * 2
        self._max_hold = sample_rate * max_hold_ms // 1000 * 2
        self._carry = b""
        self._leading = True
        self._silence_sent = 0  # bytes of the current silence already sent
        self._held = bytearray()  # the current silence beyond the pause, or the lead-in
        self._cut = 0  # bytes cut from the front of the segment
        # A window is silent only if each of its samples' high bytes is 0x00 or 0xFF
        # (see _silent): a silent window needs a run of that many such high bytes.
        self._quiet_run = bytes(self._window // 2)

    def begin(self) -> None:
        """Start a segment: its silence up to its first sound is cut to the lead-in."""
        self._carry = b""
        self._leading = True
        self._silence_sent = 0
        self._held.clear()
        self._cut = 0

    @property
    def cut_ms(self) -> int:
        """How much of the segment's front was cut, in ms: its engine's times less this
        are times in the audio as sent. Read it before :meth:`end`."""
        return self._cut // 2 * 1000 // self._rate

    def feed(self, pcm: bytes) -> bytes:
        """Take the segment's next PCM; return what can be sent now."""
        data = self._carry + pcm if self._carry else pcm
        whole = len(data) // self._window * self._window
        self._carry = data[whole:]
        if not whole:
            return b""
        # A window is silent only if each of its samples' high bytes is 0x00 or 0xFF (see
        # _silent), that is, if a run of quiet high bytes starts where the window does:
        # every window that starts before the next such run is speech, and is sent in bulk.
        quiet = data[1:whole:2].translate(_QUIET_HIGH)
        run = self._quiet_run
        if run not in quiet:
            return self._speech(data[:whole])
        out = bytearray()
        at = 0
        while at < whole:
            found = quiet.find(run, at // 2)
            speech_end = whole if found < 0 else -(-found * 2 // self._window) * self._window
            if speech_end > at:
                out += self._speech(data[at:speech_end])
                at = speech_end
            if at < whole:
                window = data[at : at + self._window]
                self._window_in(window, _silent(window), out)
                at += self._window
        return bytes(out)

    def _speech(self, pcm: bytes) -> bytes:
        """Return what *pcm* (speech throughout) sends: what was held, then itself."""
        self._leading = False
        self._silence_sent = 0
        if not self._held:
            return pcm
        out = self._held + pcm
        self._held.clear()
        return bytes(out)

    def end(self) -> bytes:
        """End the segment; return the rest of its speech and its one pause."""
        out = bytearray()
        if whole := len(self._carry) & ~1:
            window = self._carry[:whole]
            self._window_in(window, _silent(window), out)
            self._carry = b""
        if not self._leading:
            out += bytes(max(0, self._pause - self._silence_sent))
        self.begin()
        return bytes(out)

    def _window_in(self, window: bytes, silent: bool, out: bytearray) -> None:
        held = self._held
        if silent:
            if self._leading:
                held += window
                if len(held) > self._lead:
                    self._cut += len(held) - self._lead
                    del held[: len(held) - self._lead]
                return
            room = max(0, self._pause - self._silence_sent)
            out += window[:room]
            self._silence_sent += min(room, len(window))
            held += window[room:]
            if len(held) > self._max_hold:
                # A silence this long is the engine's own; let the surplus go.
                surplus = len(held) - self._max_hold
                out += held[:surplus]
                del held[:surplus]
            return
        out += self._speech(window)

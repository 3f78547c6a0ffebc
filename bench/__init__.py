"""voxrelay's benchmark: time to first audio against the limit a correct gateway can reach.

``python -m bench`` (``make bench``) starts the fake OpenAI upstream and voxrelay as
separate processes on free ports, pinned to different cores, and drives them from this
process. ``python -m bench --quick`` is a tiny run for a smoke test. Results go to
``bench/results/`` as JSON, Markdown and a PNG plot; see :mod:`bench.run`.

The benchmark measures; it never asserts. Timings do not belong in ``make test``.
"""

from __future__ import annotations

__all__: list[str] = []

"""Test doubles that speak voxrelay's interfaces for real, shared by ``tests/`` and ``bench/``.

- :mod:`fakes.openai_upstream`: :class:`~fakes.openai_upstream.FakeOpenAI`, the subset of the
  OpenAI HTTP API voxrelay uses (chat completions over SSE, speech as chunked PCM), on a
  local port, with a latency model, injectable faults and recorded requests;
- :mod:`fakes.openai_realtime`: :class:`~fakes.openai_realtime.FakeRealtime`, the OpenAI
  Realtime API over a real WebSocket;
- :mod:`fakes.providers`: in-process providers implementing the Protocols of
  :mod:`voxrelay.service.providers.base`, for driving the core without any network.

Both servers also run from the command line (``python -m fakes.openai_upstream``), which is
how the benchmark starts its upstream. The package is not installed with voxrelay: it is
imported from the repository's root, where ``python -m pytest`` and ``python -m bench`` run.
"""

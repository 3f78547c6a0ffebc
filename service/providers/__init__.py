"""Chat providers and speech engines, each behind a small Protocol."""

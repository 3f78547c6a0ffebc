"""The protocol-agnostic core of voxrelay: text in, a spoken stream of events out."""

from __future__ import annotations

__version__ = "0.1.0"

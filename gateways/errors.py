"""The one table from the core's error codes to each door's wire form."""

from __future__ import annotations

import grpc

__all__ = ["GRPC_STATUS", "WS_CLOSE"]

#: Core error code → gRPC status code.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "upstream_error": grpc.StatusCode.UNAVAILABLE,
    "upstream_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}

#: WebSocket close codes voxrelay uses (SPEC: Close codes).
WS_CLOSE = {
    "going_away": 1001,
    "policy": 1008,
    "too_big": 1009,
    "internal": 1011,
    "try_again_later": 1013,
}

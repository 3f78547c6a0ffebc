"""The one table from the core's error codes to each door's wire form."""

from __future__ import annotations

import grpc

from voxrelay.service import errors

__all__ = ["GRPC_STATUS", "WS_CLOSE"]

#: Core error code → gRPC status code.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    errors.InvalidRequest.code: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TooLarge.code: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthorized.code: grpc.StatusCode.UNAUTHENTICATED,
    errors.Forbidden.code: grpc.StatusCode.PERMISSION_DENIED,
    errors.RateLimited.code: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Busy.code: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UpstreamError.code: grpc.StatusCode.UNAVAILABLE,
    errors.UpstreamTimeout.code: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable.code: grpc.StatusCode.UNAVAILABLE,
    errors.Internal.code: grpc.StatusCode.INTERNAL,
}

#: WebSocket close codes voxrelay uses (SPEC: Close codes).
WS_CLOSE = {
    "going_away": 1001,
    "policy": 1008,
    "too_big": 1009,
    "internal": 1011,
    "try_again_later": 1013,
}

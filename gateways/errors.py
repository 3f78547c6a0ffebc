"""The one table from the core's error codes to each door's wire form."""

from __future__ import annotations

import grpc

from voxrelay.service import errors

__all__ = ["GRPC_STATUS", "HTTP_STATUS", "WS_CLOSE"]

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

#: Core error code → (HTTP status, OpenAI error ``type``) of the OpenAI-compatible door:
#: the statuses an OpenAI client expects, so that its own retry rules (429, 5xx) apply.
HTTP_STATUS: dict[str, tuple[int, str]] = {
    errors.InvalidRequest.code: (400, "invalid_request_error"),
    errors.TooLarge.code: (413, "invalid_request_error"),
    errors.Unauthorized.code: (401, "authentication_error"),
    errors.Forbidden.code: (403, "permission_error"),
    errors.RateLimited.code: (429, "rate_limit_error"),
    errors.Busy.code: (429, "rate_limit_error"),
    errors.UpstreamError.code: (503, "server_error"),
    errors.UpstreamTimeout.code: (504, "server_error"),
    errors.Unavailable.code: (503, "server_error"),
    errors.Internal.code: (500, "server_error"),
}

#: WebSocket close codes voxrelay uses (SPEC: Close codes).
WS_CLOSE = {
    "going_away": 1001,
    "policy": 1008,
    "too_big": 1009,
    "internal": 1011,
    "try_again_later": 1013,
}

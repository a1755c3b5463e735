"""The one exception tree of Taxiway.

Every error a client can see is a ``TaxiwayError``. Each class carries the HTTP status and the
OpenAI error ``type`` it renders as; one exception handler in the HTTP layer turns any of them into
``{"error": {"message", "type", "param", "code"}}``. Code raises, never returns errors. Foreign
exceptions (httpx, msgspec, torch) are mapped at the boundary with ``raise X(...) from exc``.
"""

from __future__ import annotations


class TaxiwayError(Exception):
    """Base class: an error with an HTTP status and an OpenAI-shaped body."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(TaxiwayError):
    """400: the request is malformed or asks for something the model cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    """400: the backend serving this model does not support ``param``."""

    default_code = "unsupported_parameter"


class ContextLengthExceededError(InvalidRequestError):
    """400: prompt plus requested output does not fit the model's context."""

    default_code = "context_length_exceeded"


class AuthenticationError(TaxiwayError):
    """401: missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(TaxiwayError):
    """403: the key is valid but may not do this."""

    status_code = 403
    error_type = "permission_error"


class NotFoundError(TaxiwayError):
    """404: unknown model or route."""

    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(TaxiwayError):
    """405: the route exists but not for this HTTP method."""

    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(TaxiwayError):
    """413: request body over the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitError(TaxiwayError):
    """429: too many requests or a full queue; ``retry_after`` seconds become Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after
        self.headers.setdefault("Retry-After", str(max(1, round(retry_after))))


class UpstreamError(TaxiwayError):
    """502: the upstream or backend failed (connection refused, bad response, 5xx)."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "bad_gateway"


class ServiceUnavailableError(TaxiwayError):
    """503: the model is not ready (loading, restarting, overloaded upstream)."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class UpstreamTimeoutError(TaxiwayError):
    """504: the upstream did not answer in time."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "upstream_timeout"


class UpstreamStatusError(TaxiwayError):
    """An upstream's 4xx passed on to the client with the upstream's status, type and message."""

    def __init__(
        self, message: str, *, status_code: int, error_type: str = "invalid_request_error", **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.status_code = status_code
        self.error_type = error_type


class ClientDisconnectedError(TaxiwayError):
    """499 (nginx's convention): the client went away before the response completed.

    Never sent (nobody is listening); handed to ``on_error`` hooks so logs show the request.
    """

    status_code = 499
    error_type = "client_disconnected"
    default_code = "client_disconnected"


class InternalError(TaxiwayError):
    """500: a bug on our side."""


class ConfigError(Exception):
    """Configuration is invalid; ``path`` names the key (e.g. ``models[0].options.base_url``).

    Not a ``TaxiwayError``: it happens before serving, and the CLI prints it.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path

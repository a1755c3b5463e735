"""The one exception tree of Taxiway.

Every error a client can see is a ``TaxiwayError``. Each class carries the HTTP status and the
OpenAI error ``type`` it renders as; one exception handler in the HTTP layer turns any of them into
``{"error": {"message", "type", "param", "code"}}``. Code raises, never returns errors. Foreign
exceptions (httpx, msgspec, torch) are mapped at the boundary with ``raise X(...) from exc``.
"""

from __future__ import annotations


class TaxiwayError(Exception):
    """Base class: an error with an HTTP status and an OpenAI-shaped body.

    A subclass states what it renders as in its class line, e.g.
    ``class NotFoundError(TaxiwayError, status=404, error_type="invalid_request_error")``;
    what it leaves out it inherits.
    """

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init_subclass__(
        cls, *, status: int | None = None, error_type: str | None = None, code: str | None = None, **kwargs: object
    ) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status_code = status
        if error_type is not None:
            cls.error_type = error_type
        if code is not None:
            cls.default_code = code

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


class InvalidRequestError(TaxiwayError, status=400, error_type="invalid_request_error"):
    """400: the request is malformed or asks for something the model cannot do."""


class UnsupportedParameterError(InvalidRequestError, code="unsupported_parameter"):
    """400: the backend serving this model does not support ``param``."""


class ContextLengthExceededError(InvalidRequestError, code="context_length_exceeded"):
    """400: prompt plus requested output does not fit the model's context."""


class AuthenticationError(TaxiwayError, status=401, error_type="authentication_error", code="invalid_api_key"):
    """401: missing or wrong API key."""


class PermissionDeniedError(TaxiwayError, status=403, error_type="permission_error"):
    """403: the key is valid but may not do this."""


class NotFoundError(TaxiwayError, status=404, error_type="invalid_request_error"):
    """404: unknown model or route."""


class ModelNotFoundError(NotFoundError, code="model_not_found"):
    """404: no model or alias of that name."""


class MethodNotAllowedError(TaxiwayError, status=405, error_type="invalid_request_error", code="method_not_allowed"):
    """405: the route exists but not for this HTTP method; ``allow`` lists the methods it takes
    (the ``Allow`` header RFC 9110 requires of a 405)."""

    def __init__(self, message: str, *, allow: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        if allow:
            self.headers.setdefault("Allow", allow)


class PayloadTooLargeError(TaxiwayError, status=413, error_type="invalid_request_error", code="payload_too_large"):
    """413: request body over the configured limit."""


class RequestTimeoutError(TaxiwayError, status=408, error_type="invalid_request_error", code="request_timeout"):
    """408: the request's headers or body did not arrive in time (``server.header_timeout_s``,
    ``server.body_timeout_s``)."""


class URLTooLongError(TaxiwayError, status=414, error_type="invalid_request_error", code="url_too_long"):
    """414: the request target is longer than ``server.max_url_bytes``."""


class HeadersTooLargeError(
    TaxiwayError, status=431, error_type="invalid_request_error", code="request_header_fields_too_large"
):
    """431: the request line and headers are over ``server.max_header_bytes`` or ``server.max_headers``."""


class RateLimitError(TaxiwayError, status=429, error_type="rate_limit_error", code="rate_limit_exceeded"):
    """429: too many requests or a full queue; ``retry_after`` seconds become Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after
        self.headers.setdefault("Retry-After", str(max(1, round(retry_after))))


class UpstreamError(TaxiwayError, status=502, error_type="upstream_error", code="bad_gateway"):
    """502: the upstream or backend failed (connection refused, bad response, 5xx)."""


class ServiceUnavailableError(TaxiwayError, status=503, code="service_unavailable"):
    """503: the model is not ready (loading, restarting, overloaded upstream)."""


class UpstreamTimeoutError(TaxiwayError, status=504, error_type="timeout_error", code="upstream_timeout"):
    """504: the upstream did not answer in time."""


class RequestTimeLimitError(TaxiwayError, status=504, error_type="timeout_error", code="request_time_exceeded"):
    """504, or the error event ending a stream: the request ran past ``server.max_request_time_s``."""


class UpstreamStatusError(TaxiwayError):
    """An upstream's 4xx passed on to the client with the upstream's status, type and message."""

    def __init__(
        self, message: str, *, status_code: int, error_type: str = "invalid_request_error", **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.status_code = status_code
        self.error_type = error_type


class ClientDisconnectedError(TaxiwayError, status=499, error_type="client_disconnected", code="client_disconnected"):
    """499 (nginx's convention): the client went away before the response completed.

    Never sent (nobody is listening); handed to ``on_error`` hooks so logs show the request.
    """


class InternalError(TaxiwayError):
    """500: a bug on our side."""


class ConfigError(Exception):
    """Configuration is invalid; ``path`` names the key (e.g. ``models[0].options.base_url``).

    Not a ``TaxiwayError``: it happens before serving, and the CLI prints it.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path

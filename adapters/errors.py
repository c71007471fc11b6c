"""Errors the adapter layer raises; the HTTP layer maps each to a status code."""


class AdapterError(Exception):
    """Base class. `code` is a short machine-readable reason."""

    code = "adapter_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidAdapter(AdapterError):
    """The uploaded adapter is malformed or does not fit the served base model (400)."""

    code = "invalid_adapter"


class AdapterTooLarge(AdapterError):
    """The upload exceeds the size limit (413)."""

    code = "adapter_too_large"


class QuotaExceeded(AdapterError):
    """The tenant's adapter count or byte quota would be exceeded (403)."""

    code = "quota_exceeded"


class NotFound(AdapterError):
    """No such adapter for this tenant, or no such tenant (404)."""

    code = "not_found"


class Conflict(AdapterError):
    """The name is taken (409)."""

    code = "conflict"


class SourceNotAllowed(AdapterError):
    """A server-side source the settings do not allow, e.g. a folder outside adapter_roots (403)."""

    code = "source_not_allowed"

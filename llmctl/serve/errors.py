"""Errors of the HTTP API, all sent in the OpenAI error shape.

``{"error": {"message", "type", "param", "code"}}`` is the only error body the server sends,
whatever failed: request validation (400, never FastAPI's 422), authentication, routing,
admission control or the model itself.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from llmctl.serve.protocol import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error to send to the client with an HTTP status.

    Args:
        status: the HTTP status code.
        message: a sentence that names the value at fault and what to do.
        type: the OpenAI error type, such as ``invalid_request_error``.
        param: the request field at fault, if one is.
        code: a machine-readable code, such as ``model_not_found``.
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """Return the OpenAI error object as a dict."""
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, available: list[str]) -> APIError:
    return APIError(
        404,
        f"The model {name!r} does not exist on this server; available models: {', '.join(available)}.",
        param="model",
        code="model_not_found",
    )


def queue_full(retry_after_s: int) -> APIError:
    return APIError(
        429,
        "The server is at its maximum of running and queued requests; retry after the delay in Retry-After.",
        type="rate_limit_exceeded",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def not_ready() -> APIError:
    return APIError(
        503,
        "The model is still loading; retry when GET /health returns 200.",
        type="service_unavailable",
        code="model_loading",
        headers={"Retry-After": "1"},
    )


def shutting_down() -> APIError:
    return APIError(
        503,
        "The server is shutting down and ended this generation; retry the request once the server is running again.",
        type="service_unavailable",
        code="server_shutting_down",
    )


def internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"The server failed while handling the request; the server log has the details under request id {request_id}.",
        type="server_error",
        code="internal_error",
    )


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """Turn pydantic or FastAPI validation errors into one 400 that names the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")

    field = _field_of(first)
    if not field and first.get("type") == "missing":
        return APIError(400, "The request body is empty: send a JSON object with content-type: application/json", code="invalid_json")
    if not field and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(
            400, "The request body must be a JSON object, sent with content-type: application/json", code="invalid_json"
        )
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    where = f"{field}: " if field else ""
    # A union field (such as content or prompt) reports one error per member type it tried;
    # those are one problem, so only errors in other fields count.
    others = len({_field_of(error) for error in errors[1:]} - {field})
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return APIError(400, f"Invalid request: {where}{message}{more}", param=field or None, code="invalid_value")


def _field_of(error: dict[str, Any]) -> str:
    """Return the dotted request field of a validation error, without pydantic's union type tags."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = ".".join(part for part in location if not _is_type_tag(part))
    return field


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool"} or part.startswith(("list[", "dict[", "function-", "literal["))


def error_bytes(error: APIError) -> bytes:
    """Return the JSON body of ``error``, for the middleware that answers before FastAPI runs."""
    return json.dumps(error.body()).encode()

"""The online server's errors, answered as OpenAI does: an HTTP status and {"error": {...}}."""

from __future__ import annotations

from typing import Any

from pdserve.openai.requests import InvalidRequest
from pdserve.openai.responses import error_body
from pdserve.serve.events import Expired, Finished, Outcome

# InvalidRequest codes that are not a 400.
_STATUS = {"model_not_found": 404}


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)

    @classmethod
    def invalid(cls, e: InvalidRequest) -> ApiError:
        """A request body the protocol refuses: 400 (404 for a model not served)."""
        return cls(_STATUS.get(e.code or "", 400), str(e), e.code)


def failure(outcome: Outcome) -> ApiError:
    """A request that failed (Finished, not DONE), one past its deadline, or a dead router thread."""
    if isinstance(outcome, Finished):
        return ApiError(500, f"the request failed: {outcome.request.error}", "request_failed", "server_error")
    if isinstance(outcome, Expired):
        return ApiError(504, outcome.message, "deadline_exceeded", "server_error")
    return ApiError(500, outcome.error, "internal_error", "server_error")

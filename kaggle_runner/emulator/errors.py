"""One exception per Kaggle API error, carrying the HTTP status and the message Kaggle sends."""


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict:
        # The client raises HTTPError(message) for a JSON body with code >= 400 and reads the HTTP status.
        return {"code": self.status, "message": self.message}


class BadRequest(ApiError):
    status = 400


class Unauthenticated(ApiError):
    status = 401

    def __init__(self, message: str = "Unauthenticated: missing or invalid credentials"):
        super().__init__(message)


class PermissionDenied(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class InjectedFault(ApiError):
    """A fault a test asked for: the status and message Kaggle's front end sends for it."""

    MESSAGES = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}

    def __init__(self, status: int):
        headers = {"Retry-After": "1"} if status == 429 else {}
        super().__init__(self.MESSAGES.get(status, "Injected fault"), status=status, headers=headers)

"""What every handler shares: the request's context, readers for body fields (each malformed value a 400), and
the shapes of replies (durations, times, a redirect).

Bodies use lowerCamelCase keys and drop fields equal to their defaults (docs/emulator.md); replies use
camelCase keys, enum names as strings and durations as "<seconds>s".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kaggle_runner.emulator.errors import BadRequest
from kaggle_runner.emulator.models import check_name
from kaggle_runner.emulator.state import Backend


@dataclass
class RequestContext:
    backend: Backend
    base_url: str
    user: str
    sign: Callable[[str], str] = lambda path: path  # the server's signed URL for a path


def required(body: dict, key: str) -> str:
    value = body.get(key)
    if value in (None, ""):
        raise BadRequest(f"Missing required field '{key}'")
    if not isinstance(value, str):
        raise BadRequest(f"Field '{key}' must be a string")
    return value


def name(body: dict, key: str) -> str:
    return check_name(required(body, key), key)


def integer(body: dict, key: str, default: int | None = None) -> int:
    value = body.get(key)
    if value in (None, ""):
        if default is None:
            raise BadRequest(f"Missing required field '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isascii() \
            or not str(value).strip().lstrip("-").isdigit():
        raise BadRequest(f"Field '{key}' must be an integer, not {value!r}")
    return int(value)


def split_ref(ref: str) -> tuple[str, str]:
    parts = ref.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise BadRequest(f"Invalid reference {ref!r}: expected owner/slug")
    return check_name(parts[0], "owner"), check_name(parts[1], "slug")


def duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def page(items: list, body: dict, start: int | None = None) -> tuple[list, str]:
    """One page of a listing and the token of the next ("" at the end): the client sends pageSize and, for later
    pages, the pageToken a reply handed out (`start` instead: a listing paged by page number)."""
    size = integer(body, "pageSize", 20)
    if start is None:
        start = integer(body, "pageToken", 0)
    if size < 1 or start < 0:
        raise BadRequest("pageSize must be positive and pageToken a page the listing handed out")
    return items[start:start + size], str(start + size) if start + size < len(items) else ""


def timestamp(seconds: float | None) -> str | None:
    """A moment as Kaggle's JSON carries it (ISO 8601, UTC, milliseconds)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(seconds % 1 * 1000):03d}Z"


@dataclass(frozen=True)
class Redirect:
    """A reply that is a 302 to a (signed) URL: DownloadDataset's, which the client follows with a GET."""

    url: str

"""Routes: the RPC endpoint, the log stream, output downloads, upload PUTs and the admin endpoints.

The official client reaches RPCs at {base}/v1/{service}/{Method} (PROD-style endpoint) or at
{base}/api/v1/... (any other environment, e.g. KAGGLE_API_ENVIRONMENT=LOCALHOST); both are served.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.utils import send_file
from werkzeug.wrappers import Request, Response

from kaggle_runner.emulator.clock import SystemClock
from kaggle_runner.emulator.errors import (
    ApiError,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
)
from kaggle_runner.emulator.handlers import RPCS, Redirect, RequestContext
from kaggle_runner.emulator.realism import Realism, TokenBucket
from kaggle_runner.emulator.runner import Runner
from kaggle_runner.emulator.state import Backend, check_name
from kaggle_runner.states import KaggleStatus

API_VERSION = "1"
CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+)")
DOWNLOAD_URL_TTL = 3600  # seconds an output-file URL stays valid
MAX_BODY = 64 * 2**20  # the largest JSON body served (a pushed script with the files it carries fits well under)
UPLOAD_URL_TTL = 7 * 24 * 3600  # the client resumes an upload for up to 6 days
log = logging.getLogger(__name__)


def _secret_file(path: Path, make) -> str:
    """A 0600 file's content, created with `make()` the first time."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(make())
    return path.read_text().strip()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether this process may serve on `port` now (port 80, for the client's LOCALHOST environment, needs root
    or CAP_NET_BIND_SERVICE, and nothing else on it)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def data_dir_key(data_dir: Path) -> tuple[str, Path]:
    """The API key of an emulator started without one: random, kept 0600 in its data dir."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    path = Path(data_dir) / "emulator-key"
    return _secret_file(path, lambda: secrets.token_urlsafe(24)), path

URLS = Map([
    Rule("/healthz", endpoint="health", methods=["GET"]),
    Rule("/v1/<service>/<method>", endpoint="rpc", methods=["POST"]),
    Rule("/api/v1/<service>/<method>", endpoint="rpc", methods=["POST"]),
    Rule("/v1/kernels/logs/stream/<owner>/<slug>", endpoint="log_stream", methods=["GET"]),
    Rule("/api/v1/kernels/logs/stream/<owner>/<slug>", endpoint="log_stream", methods=["GET"]),
    Rule("/files/<owner>/<slug>/<int:number>/<path:relpath>", endpoint="download", methods=["GET", "HEAD"]),
    Rule("/dataset-files/<owner>/<slug>/<int:number>/<name>", endpoint="dataset_file", methods=["GET", "HEAD"]),
    Rule("/dataset-archives/<owner>/<slug>/<int:number>/<name>", endpoint="dataset_archive",
         methods=["GET", "HEAD"]),
    Rule("/upload/<token>", endpoint="upload", methods=["PUT"]),
    Rule("/admin/faults", endpoint="admin_faults", methods=["POST"]),
    Rule("/admin/reset", endpoint="admin_reset", methods=["POST"]),
    Rule("/admin/state", endpoint="admin_state", methods=["GET"]),
    Rule("/admin/realism", endpoint="admin_realism", methods=["POST"]),
    Rule("/admin/clock", endpoint="admin_clock", methods=["POST"]),
])


def _json_body(request: Request) -> object:
    """The request's JSON, read only once the caller is known: at most MAX_BODY bytes (413 past it, unread)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"Request body over {MAX_BODY // 2**20} MiB")
    request.max_content_length = MAX_BODY  # a body without a length is cut off there too
    try:
        return json.loads(request.get_data() or b"{}")
    except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than the parser goes
        raise BadRequest("Request body is not JSON") from None


def json_response(data: dict, status: int = 200, headers: dict | None = None) -> Response:
    response = Response(json.dumps(data), status=status, mimetype="application/json", headers=headers)
    response.headers["X-Kaggle-APIVersion"] = API_VERSION
    return response


class EmulatorApp:
    def __init__(self, backend: Backend, key: str, token: str | None = None):
        self.backend = backend
        self._key = key
        self._token = token
        # Signs output and upload URLs; kept in the data dir so a restarted emulator honours its uploads'.
        self._url_secret = _secret_file(backend.data_dir / ".url-secret", lambda: secrets.token_hex(32)).encode()
        self.download_ttl, self.upload_ttl = DOWNLOAD_URL_TTL, UPLOAD_URL_TTL
        self.bucket = TokenBucket(backend.realism, backend.clock)
        self.base_url = ""  # set once the server knows its port
        self.request_count = 0  # lets tests prove that bad input sent nothing
        self.last_request = time.monotonic()  # wall time: --idle-exit is about this machine's processes
        self.calls: collections.Counter[str] = collections.Counter()  # RPCs served, by method

    # -- authentication ------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme == "Basic":
            try:
                user, _, key = base64.b64decode(value, validate=True).partition(b":")
            except ValueError:
                raise Unauthenticated() from None
            if hmac.compare_digest(user, self.backend.username.encode()) & hmac.compare_digest(key, self._key.encode()):
                return self.backend.username
        elif scheme == "Bearer" and self._token and hmac.compare_digest(value.encode(), self._token.encode()):
            return self.backend.username
        raise Unauthenticated()

    # -- signed URLs (no credentials travel with them, as with Kaggle's storage URLs) ------------------
    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self._url_secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, ttl: float | None = None) -> str:
        ttl = (self.upload_ttl if path.startswith("/upload/") else self.download_ttl) if ttl is None else ttl
        expires = int(self.backend.clock() + ttl)
        return f"{self.base_url}{quote(path)}?expires={expires}&signature={self._signature(path, expires)}"

    def verify(self, request: Request) -> None:
        expires, signature = request.args.get("expires", ""), request.args.get("signature", "")
        if not (expires.isascii() and expires.isdigit()) or not signature.isascii():
            raise PermissionDenied("Missing or malformed URL signature")
        if not hmac.compare_digest(signature.encode(), self._signature(request.path, int(expires)).encode()):
            raise PermissionDenied("Invalid URL signature")
        if int(expires) < self.backend.clock():
            raise PermissionDenied("This URL has expired")

    # -- endpoints -----------------------------------------------------------------------------------
    def on_health(self, request: Request) -> Response:
        return json_response({"ok": True, "username": self.backend.username})

    def on_rpc(self, request: Request, service: str, method: str) -> Response:
        introspect = (service, method) == ("security.OAuthService", "IntrospectToken")
        user = self.backend.username if introspect else self.authenticate(request)  # before the body is read
        handler = RPCS.get((service, method))
        if handler is None and not introspect:
            raise NotFound(f"Method {service}/{method} is not served by the emulator")
        body = _json_body(request)
        if not isinstance(body, dict):
            raise BadRequest("Request body must be a JSON object")
        if introspect:
            active = bool(self._token) and hmac.compare_digest(str(body.get("token", "")).encode(),
                                                               (self._token or "").encode())
            return json_response({"active": active, "username": self.backend.username if active else ""})
        self.calls[method] += 1
        self.backend.check_fault(method)
        answer = handler(RequestContext(self.backend, self.base_url, user, self.sign), body)
        self.backend.check_fault(method, after=True)
        if isinstance(answer, Redirect):  # 302, not 307: the client's GET must not repeat the JSON body
            return Response(status=302, headers={"Location": answer.url, "X-Kaggle-APIVersion": API_VERSION})
        return json_response(answer)

    def on_log_stream(self, request: Request, owner: str, slug: str) -> Response:
        self.authenticate(request)
        check_name(owner, "owner"), check_name(slug, "slug")
        self.backend.check_fault("LogStream")
        _, version = self.backend.get_version(owner, slug, request.args.get("versionLabel"))
        if KaggleStatus(version.status).terminal:
            # A finished session: the persisted log as one JSON array, as Kaggle's midtier serves it.
            return json_response(self.backend.read_log_events(owner, slug, version))  # type: ignore[arg-type]

        def events():
            sent = 0  # a reconnecting client skips what it has seen: always replay from the start
            while True:
                finished = KaggleStatus(version.status).terminal
                log = self.backend.read_log_events(owner, slug, version)
                for event in log[sent:]:
                    yield f"data: {json.dumps(event)}\n\n"
                sent = len(log)
                if finished:
                    yield "data: END_OF_LOG\n\n"
                    return
                time.sleep(0.25)

        return Response(events(), mimetype="text/event-stream", content_type="text/event-stream; charset=utf-8")

    def on_download(self, request: Request, owner: str, slug: str, number: int, relpath: str) -> Response:
        self.verify(request)
        self.backend.check_fault("DownloadOutput")
        _, version = self.backend.get_version(owner, slug, f"v{number}")
        files = dict(self.backend.output_files(owner, slug, version))
        path = files.get(relpath)
        if path is None:
            raise NotFound(f"No output file {relpath!r} in {owner}/{slug} version {number}")
        response = send_file(path, request.environ, conditional=True, etag=True, max_age=0,
                             mimetype="application/octet-stream")
        if request.method == "GET" and response.status_code in (200, 206) and self.backend.take_download_drop():
            response = self._dropped(response)
        return response

    def on_dataset_file(self, request: Request, owner: str, slug: str, number: int, name: str) -> Response:
        self.verify(request)
        path = self.backend.dataset_file(check_name(owner, "owner"), check_name(slug, "slug"), number, name)
        return send_file(path, request.environ, conditional=True, etag=True, max_age=0,
                         mimetype="application/octet-stream")  # never JSON: the client would parse it

    def on_dataset_archive(self, request: Request, owner: str, slug: str, number: int, name: str) -> Response:
        self.verify(request)
        path = self.backend.dataset_archive(check_name(owner, "owner"), check_name(slug, "slug"), number)
        return send_file(path, request.environ, conditional=True, etag=True, max_age=0, mimetype="application/zip",
                         download_name=name)

    @staticmethod
    def _dropped(response: Response) -> Response:
        """Send the headers and half the body, then cut the connection (a fault for tests)."""
        body = response.response
        length = int(response.headers.get("Content-Length", "0"))

        def half():
            sent = 0
            for chunk in body:
                if sent + len(chunk) >= length // 2:
                    yield chunk[: max(0, length // 2 - sent)]
                    raise ConnectionAbortedError("injected fault: connection dropped mid-download")
                sent += len(chunk)
                yield chunk

        response.response = half()
        response.direct_passthrough = True
        return response

    def on_upload(self, request: Request, token: str) -> Response:
        self.verify(request)
        try:
            self.backend.check_fault("UploadBlob")
        except ApiError as fault:
            request.get_data()  # drain the body so the client sees our status, not a reset
            return Response(status=fault.status)  # a 503 means INCOMPLETE to the client: no Retry-After
        blob = self.backend.blob(token)
        content_range = request.headers.get("Content-Range")
        if content_range and content_range.startswith("bytes */"):
            if blob.received >= blob.content_length:
                return json_response({})
            headers = {"Range": f"bytes=0-{blob.received - 1}"} if blob.received else {}
            return Response(status=308, headers=headers)
        start = 0
        if content_range:
            match = CONTENT_RANGE.fullmatch(content_range.strip())
            if not match or match.group(1) is None:
                raise BadRequest(f"Bad Content-Range {content_range!r}")
            start = int(match.group(1))
        length = request.headers.get("Content-Length")
        if length is not None and not (length.isascii() and length.strip().isdigit()):
            raise BadRequest("Content-Length must be a number")
        blob = self.backend.write_blob(token, start, request.stream, request.content_length)
        if blob.received >= blob.content_length:
            return json_response({}, status=200)
        return Response(status=503)

    def on_admin_faults(self, request: Request) -> Response:
        self.authenticate(request)
        spec = _json_body(request)
        if not isinstance(spec, dict):
            raise BadRequest("Expected a JSON object of faults")
        return json_response(self.backend.set_faults(spec))

    def on_admin_realism(self, request: Request) -> Response:
        self.authenticate(request)
        with self.backend.lock:
            return json_response(self.backend.realism.update(_json_body(request)))

    def on_admin_clock(self, request: Request) -> Response:
        """{"advance": seconds}: the emulator's time moves on (windows pass, sessions reach their limits)."""
        self.authenticate(request)
        spec = _json_body(request)
        seconds = spec.get("advance", 0) if isinstance(spec, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < 10**8:
            raise BadRequest("Expected {\"advance\": seconds}, a number from 0")
        return json_response({"now": self.backend.clock.advance(float(seconds))})

    def on_admin_reset(self, request: Request) -> Response:
        self.authenticate(request)
        self.backend.reset()
        return json_response({})

    def on_admin_state(self, request: Request) -> Response:
        self.authenticate(request)
        return json_response(json.loads(self.backend.state_file.read_text()) if self.backend.state_file.exists()
                             else {})

    # -- WSGI ----------------------------------------------------------------------------------------
    def dispatch(self, request: Request) -> Response:
        adapter = URLS.bind_to_environ(request.environ)
        self.last_request = time.monotonic()
        try:
            if not request.path.startswith(("/admin/", "/healthz")):
                self.request_count += 1
                self._rate_limit(request)
            endpoint, values = adapter.match()
            return getattr(self, f"on_{endpoint}")(request, **values)
        except ApiError as error:  # the body may be unread (401, 413): the connection closes after the answer
            return json_response(error.body(), status=error.status, headers={**error.headers, "Connection": "close"})
        except HTTPException as error:
            return json_response({"code": error.code, "message": error.description}, status=error.code or 500,
                                 headers={"Connection": "close"})
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeError) as error:
            # Malformed input that slipped past the checks: a one-line 400, never a traceback.
            log.debug("malformed request to %s", request.path, exc_info=True)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            return json_response({"code": 400, "message": f"Malformed request: {message}"[:300]}, status=400)

    def _rate_limit(self, request: Request) -> None:
        """Kaggle's rate limit: a token bucket over every API request, reads included."""
        wait = self.bucket.take()
        if wait > 0:
            if (request.content_length or 0) <= MAX_BODY:
                request.get_data()  # drain the body so the client reads our status, not a reset
            raise ApiError("Too Many Requests", status=429,
                                 headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def __call__(self, environ, start_response):
        return self.dispatch(Request(environ))(environ, start_response)


class EmulatorServer:
    """A threaded emulator on a port of this machine; start() returns once it answers."""

    def __init__(self, data_dir: Path, username: str = "local", key: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None, session_limit: float | None = None,
                 dataset_delay: float = 0.0, kill_grace_seconds: float = 10.0, realism: Realism | None = None,
                 clock: SystemClock | None = None):
        self.key = key or secrets.token_urlsafe(24)  # never a constant anyone could guess
        self.backend = Backend(Path(data_dir), username, session_limit=session_limit, dataset_delay=dataset_delay,
                               kill_grace_seconds=kill_grace_seconds, realism=realism, clock=clock)
        self.clock = self.backend.clock
        self.runner = Runner(self.backend)
        self.app = EmulatorApp(self.backend, self.key, token)
        # Per-request access lines would drown the launcher's own output; errors still show.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        try:
            self.server = make_server(host, port, self.app, threaded=True)
        except BaseException:
            self.backend.close()  # free the data dir
            raise
        self.host, self.port = host, self.server.server_port
        display_host = "localhost" if host in ("127.0.0.1", "localhost") else host
        self.url = f"http://{display_host}:{self.port}" if self.port != 80 else f"http://{display_host}"
        self.app.base_url = self.url
        self._thread: threading.Thread | None = None

    def start(self) -> EmulatorServer:
        # A short poll interval: stop() waits for the serve loop to notice, and tests stop many emulators.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.runner.start_queued()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.backend.close()  # before the kills, so their watcher threads record nothing
        self.runner.stop_all()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(host: str, port: int, data_dir: Path, username: str, key: str,
                  session_limit: float | None = None, dataset_delay: float = 0.0,
                  token: str | None = None, ready_file: Path | None = None, realism: Realism | None = None,
                  idle_exit: float | None = None) -> None:
    server = EmulatorServer(data_dir, username=username, key=key, host=host, port=port, token=token,
                            session_limit=session_limit, dataset_delay=dataset_delay, realism=realism)
    kind = " (realism off)" if realism is not None and realism == Realism.off() else ""
    print(f"kaggle-runner emulator listening on {server.url} (user {username}, data in {data_dir}){kind}",
          flush=True)
    if ready_file is not None:
        ready_file.write_text(json.dumps({"url": server.url, "port": server.port}))
    server.runner.start_queued()

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if idle_exit:
        threading.Thread(target=_exit_when_idle, args=(server, idle_exit), daemon=True).start()
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server.server_close()
        server.backend.close()
        server.runner.stop_all()


def _exit_when_idle(server: EmulatorServer, seconds: float) -> None:
    """Stop serving once no request came for `seconds` and no version runs or waits: the background emulator
    --local starts must not outlive its use (a later --local command starts it again, state intact)."""
    while True:
        time.sleep(min(5.0, seconds / 4))
        if time.monotonic() - server.app.last_request >= seconds and server.runner.idle():
            print(f"kaggle-runner emulator: idle for {seconds:.0f} s with nothing running; exiting", flush=True)
            server.server.shutdown()
            return


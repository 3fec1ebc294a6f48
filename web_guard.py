"""HTTP guards in front of Gradio's routes: one ASGI middleware, installed by web.py through launch(app_kwargs=...).

- A request body over `max_body` bytes is answered 413 before any route reads it (a 45 MB prompt once froze
  every route for seconds while it was parsed and cleaned).
- The file routes (`/gradio_api/file=...`, `/file/`, `/proxy=`) serve only PNG and GIF files under the folders
  the app writes to (its output folder, the folder of Gradio's copies of its results), checked by their first
  bytes and sent as image/png or image/gif with `X-Content-Type-Options: nosniff`. Anything else, such as an
  uploaded picture, .html or .svg, is 404: no upload is served back.
- A call of an endpoint that does not exist is 404 with the names of those that do (Gradio answered 500 and
  logged a traceback).
- With --auth: failed logins are counted per client address, and after a few each further attempt must wait
  for a doubling delay or is answered 429 without the password being checked; and the login page, which Gradio
  renders with the API's full description embedded, goes out without it.
"""
import json
import math
import os
import re
import time
from collections import OrderedDict

MAX_BODY_BYTES = 2 * 2 ** 20  # requests of the app are a few hundred bytes; uploads are capped lower by Gradio
FILE_ROUTE = re.compile(r"(?:/gradio_api)?/(?:file=|file/|proxy=)(.*)", re.S)
IMAGE_TYPES = {".png": ((b"\x89PNG\r\n\x1a\n",), b"image/png"), ".gif": ((b"GIF87a", b"GIF89a"), b"image/gif")}
CALL_ROUTE = re.compile(r"(?:/gradio_api)?/(?:call/v2|call|run|api)/([^/]+)/?")  # POSTs naming an endpoint
LOGIN_ROUTES = ("/login", "/login/")
API_INFO = re.compile(rb"(window\.gradio_api_info\s*=\s*)(.*?)(;\s*</script>)", re.S)  # JSON there escapes "<"


async def respond(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class LoginThrottle:
    """Failed logins per client: the first `free` are checked as usual; after that an attempt is checked only
    once 1, 2, 4, ... (at most `max_wait_s`) seconds have passed since the previous one, else refused. An attempt
    counts as failed from its start until it succeeds, so parallel guesses are throttled too. Success clears a
    client's record; records expire after `forget_s` quiet seconds, and at most `max_clients` are kept."""

    def __init__(self, free: int = 5, max_wait_s: float = 300.0, forget_s: float = 3600.0, max_clients: int = 10_000,
                 clock=time.monotonic):
        self.free, self.max_wait_s, self.forget_s, self.max_clients, self.clock = free, max_wait_s, forget_s, max_clients, clock
        self.failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (failed attempts, last one)

    def wait_s(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        count, last = self.failures.get(client, (0, 0.0))
        if self.clock() - last > self.forget_s:
            self.failures.pop(client, None)
            return 0.0
        if count < self.free:
            return 0.0
        return max(0.0, last + min(2.0 ** (count - self.free), self.max_wait_s) - self.clock())

    def attempt(self, client: str) -> None:
        count, _ = self.failures.pop(client, (0, 0.0))
        self.failures[client] = (count + 1, self.clock())
        while len(self.failures) > self.max_clients:
            self.failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


class WebGuard:
    """The ASGI middleware. `served`: folders whose PNG/GIF files the file routes may serve; `endpoints`: the
    names a call may name (None: any)."""

    def __init__(self, app, served, max_body: int = MAX_BODY_BYTES, throttle: LoginThrottle | None = None,
                 hide_api_from_login_page: bool = False, endpoints=None):
        self.app, self.max_body, self.throttle, self.endpoints = app, max_body, throttle, endpoints
        self.served = [os.path.realpath(folder) for folder in served]
        self.hide_api = hide_api_from_login_page

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await respond(send, 400, "invalid Content-Length")
        if int(length) > self.max_body:
            return await respond(send, 413, f"request body over {self.max_body} bytes")
        call = CALL_ROUTE.fullmatch(scope["path"]) if scope["method"] == "POST" else None
        if call and self.endpoints is not None and call.group(1) not in self.endpoints:
            return await respond(send, 404, f"there is no endpoint {call.group(1)[:40]!r}; the endpoints are "
                                            f"{', '.join(self.endpoints)}")
        file = FILE_ROUTE.fullmatch(scope["path"])
        if file:
            content_type = self.image_type(file.group(1))
            if content_type is None:
                return await respond(send, 404, "Not Found")
            send = with_type(send, content_type)
        elif self.hide_api and scope["method"] == "GET":
            send = without_api_info(send)
        if self.throttle is not None and scope["method"] == "POST" and scope["path"] in LOGIN_ROUTES:
            return await self.login(scope, receive, send)
        await self.capped(scope, receive, send)

    async def capped(self, scope, receive, send):
        """Run the app, answering 413 if a body without Content-Length (chunked) grows over the limit."""
        seen, state = 0, {"started": False, "refused": False}

        async def receive_capped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    if not state["started"]:
                        state["refused"] = True
                        await respond(send, 413, f"request body over {self.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message):
            if state["refused"]:
                return
            state["started"] |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_capped, send_unless_refused)
        except Exception:
            if not state["refused"]:  # the app's fault, not the cut-off body's: let Gradio's handlers see it
                raise

    async def login(self, scope, receive, send):
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_s(client)
        if wait > 0:
            seconds = math.ceil(wait)
            return await respond(send, 429, f"too many failed logins from your address; try again in {seconds} s",
                                 [(b"retry-after", str(seconds).encode())])
        self.throttle.attempt(client)
        status = []

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.capped(scope, receive, send_noting_status)
        if status and status[0] < 300:
            self.throttle.succeeded(client)

    def image_type(self, raw: str) -> bytes | None:
        """The content type to serve the file at `raw` (the path in a file route) as, or None to refuse it."""
        if not os.path.isabs(raw) or "\0" in raw:
            return None
        real = os.path.realpath(raw)
        if real != os.path.normpath(raw):  # no "..", no symlinks: the file Gradio opens is the one checked here
            return None
        kind = IMAGE_TYPES.get(os.path.splitext(real)[1].lower())
        if kind is None or not any(real.startswith(folder + os.sep) for folder in self.served) or not os.path.isfile(real):
            return None
        try:
            with open(real, "rb") as f:
                head = f.read(8)
        except OSError:
            return None
        magics, content_type = kind
        return content_type if head.startswith(magics) else None


def with_type(send, content_type: bytes):
    """`send` with a successful response's Content-Type set to `content_type` and nosniff added."""
    async def send_typed(message):
        if message["type"] == "http.response.start" and message["status"] < 300:
            kept = [(k, v) for k, v in message["headers"] if k.lower() not in (b"content-type", b"x-content-type-options")]
            message = {**message, "headers": [*kept, (b"content-type", content_type), (b"x-content-type-options", b"nosniff")]}
        await send(message)
    return send_typed


def without_api_info(send):
    """`send` with the API description removed from Gradio's login page (an HTML page whose config says
    auth_required); if it cannot be removed, the page is withheld rather than sent with it."""
    start, chunks = None, []

    async def send_scrubbed(message):
        nonlocal start
        if message["type"] == "http.response.start":
            if dict(message["headers"]).get(b"content-type", b"").startswith(b"text/html"):
                start = message  # held until the body is complete
                return
        elif start is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body, status = b"".join(chunks), start["status"]
            if b'"auth_required":true' in body:
                body = API_INFO.sub(rb"\1null\3", body)
                if b"named_endpoints" in body:
                    body, status = b"login page withheld: it would describe the API", 500
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "status": status, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        await send(message)
    return send_scrubbed


def parse_auth(text: str | None):
    """--auth's user:password, or None without the flag; a one-line error for anything else."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth takes user:password (both non-empty)")
    return user, password

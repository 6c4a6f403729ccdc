"""What the service refuses before a request reaches it, and the headers every answer carries.

- `Guard` (ASGI middleware): unknown Host names when bound to loopback (DNS rebinding: a web
  page whose name resolves to 127.0.0.1 would otherwise be same-origin with the service) ->
  400; a POST from a page on another origin (a plain HTML form needs no CORS preflight) -> 403;
  more than `limit` requests in progress -> 503 with Retry-After.  Every answer gets
  X-Content-Type-Options, X-Frame-Options, Referrer-Policy and a Content-Security-Policy.
- `guarded_protocol(timeout)`: uvicorn's h11 protocol plus what uvicorn lacks: a request whose
  headers are not complete within `timeout` seconds, or whose body stops arriving for that long,
  is answered 408 and closed; connections beyond half the process's file descriptors evict the
  longest-idle connection (a flood of half-open connections cannot starve new clients or the
  uploads' temporary files); and uvicorn's plain-text 400 for a malformed request is JSON.

Every error body is JSON {"error": "..."}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re

log = logging.getLogger("uvicorn.error")

# `fruitnet serve` defaults (here, not in server.py, so the command line reads them without
# importing the web stack)
TIMEOUT_KEEP_ALIVE = 5  # seconds an idle connection stays open between requests
TIMEOUT_REQUEST = 30  # seconds for a request's headers, and the longest pause in its upload
LIMIT_CONCURRENCY = 64  # requests in progress; more are answered 503

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 503: "Service Unavailable"}


def json_error(status: int, message: str, headers: list | None = None) -> tuple[dict, dict]:
    """The two ASGI messages of a JSON error answer."""
    body = json.dumps({"error": message}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])]}
    return start, {"type": "http.response.body", "body": body}


def page_csp(html: str) -> str:
    """A strict policy for `html`: only its own inline scripts and styles (by hash), fetches to this
    origin, previews of the user's own files (blob:) and the inline icon (data:), no framing, no forms posted elsewhere."""
    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", html, flags=re.S | re.I)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    none = "'none'"
    return (f"default-src 'none'; script-src {hashes('script') or none}; style-src {hashes('style') or none}; "
            "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def host_name(host: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1' (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: Host and Origin checks, a limit on requests in progress, security headers."""

    def __init__(self, app, csp: str, limit: int | None = None, allowed_hosts: set[str] | None = None):
        self.app, self.limit, self.allowed_hosts = app, limit, allowed_hosts
        self.in_progress = 0
        self.headers = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                        (b"referrer-policy", b"no-referrer"), (b"content-security-policy", csp.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal:
            for message in json_error(*refusal):
                await send_with_headers(message)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.in_progress -= 1

    def _refusal(self, scope) -> tuple | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            return 400, (f"unknown Host {host[:100]!r}: this service answers to "
                         f"{', '.join(sorted(self.allowed_hosts))} only (DNS rebinding protection)")
        origin = headers.get("origin")
        if scope["method"] in UNSAFE_METHODS and origin is not None:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            if origin.lower() != own:
                return 403, (f"cross-origin request refused: a page from {origin[:100]} may not post to this "
                             "service (use the page it serves, or a client that sends no Origin)")
        if self.limit is not None and self.in_progress >= self.limit:
            return 503, f"busy: {self.in_progress} requests in progress (limit {self.limit}); try again shortly", \
                [(b"retry-after", b"1")]
        return None


def raw_json_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for use outside any request cycle."""
    start, body = json_error(status, message, [(b"connection", b"close")])
    head = f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode()
    head += b"".join(k + b": " + v + b"\r\n" for k, v in start["headers"])
    return head + b"\r\n" + body["body"]


def guarded_protocol(timeout: float, max_connections: int):
    """uvicorn's h11 protocol with request timeouts, a connection cap and a JSON 400."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        evictions = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer = None
            self._last_seen = self.loop.time()
            if len(self.connections) > max_connections:
                self._evict_idlest()
            self._arm()  # the first request's headers must come within `timeout`

        def data_received(self, data: bytes) -> None:
            self._last_seen = self.loop.time()
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                self._arm(restart=True)  # the body may take long, but must keep coming
            elif state is h11.IDLE:
                self._arm()  # a deadline for the headers, not restarted by each byte (slowloris)
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle time
            self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # uvicorn's is text/plain
            self.transport.write(raw_json_response(400, "invalid HTTP request"))
            self.transport.close()

        def _arm(self, restart: bool = False) -> None:
            if self._timer is not None and not restart:
                return
            self._disarm()
            self._timer = self.loop.call_later(timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                # The application is reading this body: it sees the disconnect and logs it, once.
                self.scope["fruitnet.stalled"] = timeout
                if not self.cycle.response_started:
                    self.transport.write(raw_json_response(408, f"request body stalled for {timeout:g}s"))
            elif self.conn.trailing_data[0]:  # part of the headers came (a connection that sent nothing is just closed)
                log.info("%s: request headers not complete within %gs: closed", _peer(self.client), timeout)
                self.transport.write(raw_json_response(408, f"request headers not complete within {timeout:g}s"))
            self.transport.close()

        def _idle(self) -> bool:
            return (not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)
                    and self.conn.their_state is not h11.SEND_BODY)

        def _evict_idlest(self) -> None:
            """Close the connection that has been quiet longest without a request in progress."""
            idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self and c._idle()]
            victim = min(idle, key=lambda c: c._last_seen, default=self)
            GuardedH11Protocol.evictions += 1
            if GuardedH11Protocol.evictions % 100 == 1:  # a flood must not flood the log too
                log.warning("more than %d connections open: closing the idlest (%d so far)",
                            max_connections, GuardedH11Protocol.evictions)
            victim.transport.close()

    return GuardedH11Protocol


def _peer(client) -> str:
    return "%s:%d" % tuple(client) if client else "a client"

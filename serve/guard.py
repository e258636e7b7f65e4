"""What an HTTP request must pass before the service looks at its body.

A hostile client, or a web page a user happens to visit, can reach the service as easily as a friendly
one. Each check here answers with an `APIError` (a JSON error body, as every other refusal):

- 400  the Host header is not one this deployment serves (a DNS-rebinding page names its own host)
- 401  an API key is configured and the request does not carry it as `Authorization: Bearer <key>`
- 415  the body is not declared as `application/json`: a browser sends text/plain and form posts
       cross-site without asking, but never application/json (that needs a CORS preflight we refuse)
- 413  the body passes the byte limit, whatever its Content-Length says (chunked uploads have none)
- 408  the body does not arrive within the read deadline (a client that trickles bytes holds a request
       slot while it does)
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect, Request

from serve.protocol import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_host_names(allowed_hosts: str, bind_host: str) -> frozenset[str] | None:
    """The Host names a deployment answers (None = any), from `serve.allowed_hosts` and `serve.host`."""
    names = frozenset(name.strip().lower() for name in allowed_hosts.split(",") if name.strip())
    if "*" in names:
        return None
    if names:
        return names
    return LOOPBACK_NAMES if _is_loopback(bind_host) else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(request: Request, allowed: frozenset[str] | None) -> None:
    if allowed is None:
        return
    header = request.headers.get("host", "")
    try:
        name = (urlsplit(f"//{header}").hostname or "").lower()  # strips the port, unwraps [::1]
    except ValueError:  # e.g. an unclosed IPv6 bracket
        name = ""
    if name not in allowed:
        raise APIError(400, f"Host header {header[:100]!r} is not served here; allowed: {', '.join(sorted(allowed))} "
                            f"(serve.allowed_hosts)", code="invalid_host")


def check_api_key(request: Request, api_key: str) -> None:
    """`Authorization: Bearer <key>`, compared in constant time (no early exit on the first wrong byte)."""
    if not api_key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # comparing digests: equal lengths, so not even the key's length leaks through timing
    if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(given.strip()), _digest(api_key)):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def check_json_content_type(request: Request) -> None:
    declared = request.headers.get("content-type", "")
    media_type = declared.partition(";")[0].strip().lower()
    if media_type != "application/json":
        got = repr(declared[:100]) if declared else "none"
        raise APIError(415, f"the request body must be sent as 'Content-Type: application/json'; got {got}",
                       code="unsupported_media_type")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, read as it arrives: 413 the moment it passes `limit` bytes, 408 when it is not complete
    within `timeout_s` seconds. Nothing past the limit is ever held."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before a byte is read
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"request body is over {limit} bytes (the limit)")
    except ClientDisconnect:  # nobody will read the answer; this only ends the request quietly
        raise APIError(400, "the client disconnected while sending the body", code="client_disconnected") from None
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (received {len(body)} bytes)",
                       code="request_timeout") from None
    return bytes(body)

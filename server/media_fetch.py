"""Turn an `image_url` / `video_url` into bytes: `data:` URLs, http(s) URLs and (opt-in) local files.

Remote fetching is a server-side request forgery surface, so it is deny-by-default:
- the host is resolved here and every address checked (private, loopback, link-local, multicast, reserved and
  unspecified ranges are refused unless `allow_private_media_urls`); the connection then goes to the checked
  address itself (Host header and TLS SNI keep the name), so a DNS answer that changes between check and
  connect (rebinding) cannot redirect it;
- redirects are followed by hand, at most `max_media_redirects`, each hop checked again;
- the byte limit is checked against Content-Length and again while streaming (after content decoding), and the
  whole download has a deadline.

Every URL is checked before use (`checked_http_url`): no control, whitespace or separator characters, a
well-formed host (DNS labels of 1-63 letters, digits, '-' or '_', valid IDNA, at most 253 characters; IPv6
literals that parse; no percent-encoding; no ambiguous numeric spellings such as `0x7f.1` or `2130706433`,
which resolvers read as IPv4), a port in 1..65535; redirect targets are checked the same way. Anything else
is a 400 naming the URL, never an exception from deeper down.

Local files are read only from under `allowed_local_media_path`, after resolving symlinks and `..`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import anyio
import httpx
import idna

from plm_serve.server.config import ServerConfig
from plm_serve.server.errors import APIError, bad_request

# host, port -> resolved IP addresses (injectable so tests can map names without DNS)
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECTS = (301, 302, 303, 307, 308)
_INLINE_DATA_URL_CHARS = 256 * 1024
MAX_URL_CHARS = 8192  # for http(s) and file URLs (data URLs are bounded by the media byte limits)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_NUMERIC_LABEL = re.compile(r"(0[xX][0-9A-Fa-f]*|[0-9]+)")


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses; False for everything an attacker could aim inside."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def too_large(what: str, limit: int, param: str | None) -> APIError:
    return APIError(
        413, f"{what} is larger than the limit of {limit} bytes", param=param, code="media_too_large"
    )


class MediaFetcher:
    """Fetches media for requests. One per app (it owns an httpx client); `aclose()` in the lifespan."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        resolver: Resolver = resolve_host,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allow_private = config.allow_private_media_urls
        self.max_redirects = config.max_media_redirects
        self.timeout_s = config.media_fetch_timeout_s
        root = config.allowed_local_media_path
        self.local_root = Path(root).resolve() if root else None
        self.resolver = resolver
        # No keep-alive: connections go to pinned IPs with per-request SNI, so a pooled TLS connection must
        # never be
        # reused for another host name. No trust_env: a proxy would defeat the address checks.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(min(5.0, self.timeout_s), read=self.timeout_s),
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": "plm-serve"},
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str, *, max_bytes: int, param: str | None = None) -> bytes:
        """The bytes behind `url`; APIError 400 (unusable URL) or 413 (over `max_bytes`)."""
        scheme = url_scheme(url)
        if scheme == "data":
            if len(url) < _INLINE_DATA_URL_CHARS:
                return decode_data_url(url, max_bytes=max_bytes, param=param)
            # base64 of a large image or video takes tens of milliseconds: keep it off the event loop
            return await asyncio.to_thread(decode_data_url, url, max_bytes=max_bytes, param=param)
        if scheme in ("http", "https"):
            try:
                with anyio.fail_after(self.timeout_s):
                    return await self._fetch_http(url, max_bytes, param)
            except TimeoutError:
                raise bad_request(
                    f"timed out after {self.timeout_s:g}s fetching {url}", param=param
                ) from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise bad_request(
                    f"could not fetch {shown(url)}: {type(exc).__name__}: {exc}", param=param
                ) from None
        if scheme in ("", "file"):
            return await asyncio.to_thread(self._read_local, url, max_bytes, param)
        raise bad_request(
            f"unsupported URL scheme {scheme[:20]!r}: use https://, http:// or data:", param=param
        )

    # ------------------------------------------------------------------------------------------------ http(s)
    async def _fetch_http(self, url: str, max_bytes: int, param: str | None) -> bytes:
        current = checked_http_url(url, param)
        for _ in range(self.max_redirects + 1):
            pinned, headers, extensions = await self._pin(current, param)
            async with self.client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
                if resp.status_code in _REDIRECTS and "location" in resp.headers:
                    current = _redirect_target(current, resp.headers["location"], url, param)
                    continue
                if resp.status_code != 200:
                    raise bad_request(f"could not fetch {shown(url)}: HTTP {resp.status_code}", param=param)
                return await _read_limited(resp, max_bytes, shown(url), param)
        raise bad_request(f"{shown(url)}: more than {self.max_redirects} redirects", param=param)

    async def _pin(self, url: httpx.URL, param: str | None) -> tuple[httpx.URL, dict, dict]:
        """Resolve and check `url`'s host; return the URL aimed at a checked address, Host header and SNI."""
        host = url.raw_host.decode("ascii")  # IDNA-encoded: what DNS and the Host header carry
        try:
            addresses = await self.resolver(host, url.port or (443 if url.scheme == "https" else 80))
        except (OSError, UnicodeError) as exc:
            raise bad_request(f"could not resolve {host}: {exc}", param=param) from None
        if not addresses:
            raise bad_request(f"could not resolve {host}", param=param)
        if not self.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused:
                raise bad_request(
                    f"{host} resolves to a non-public address ({refused[0]}); media URLs must point to "
                    "public hosts (the operator can allow private ones with --allow-private-media-urls)",
                    param=param,
                    code="media_url_refused",
                )
        bracketed = f"[{host}]" if ":" in host else host  # an IPv6 literal
        headers = {"Host": bracketed if url.port is None else f"{bracketed}:{url.port}"}
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        return url.copy_with(host=addresses[0].split("%", 1)[0]), headers, extensions

    # ------------------------------------------------------------------------------------------ local files
    def _read_local(self, url: str, max_bytes: int, param: str | None) -> bytes:
        if self.local_root is None:
            raise bad_request(
                "local media paths are disabled; the operator can allow a directory with "
                "--allowed-local-media-path",
                param=param,
            )
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise bad_request(f"malformed file URL {shown(url)}: {exc}", param=param) from None
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise bad_request(f"file URLs must name a local path, got host {parts.netloc!r}", param=param)
            raw = unquote(parts.path)
        else:
            raw = url
        if not raw or len(raw) > MAX_URL_CHARS or _forbidden_char(raw) is not None:
            raise bad_request(f"{shown(raw)} is not a usable file path", param=param)
        try:
            path = (self.local_root / raw).resolve()  # an absolute `raw` replaces the root; checked below
            if not path.is_relative_to(self.local_root):
                raise bad_request(
                    f"{shown(raw)} is outside the allowed media directory",
                    param=param,
                    code="media_url_refused",
                )
            if not path.is_file():
                raise bad_request(f"{shown(raw)} is not a readable file", param=param)
            if path.stat().st_size > max_bytes:
                raise too_large(shown(raw), max_bytes, param)
            return path.read_bytes()
        except (OSError, ValueError) as exc:
            if isinstance(exc, APIError):
                raise
            raise bad_request(f"cannot read {shown(raw)}: {type(exc).__name__}", param=param) from None


# -------------------------------------------------------------------------------------------- URL checks
def shown(url: str) -> str:
    """A URL as error messages quote it: at most 120 characters."""
    return url if len(url) <= 120 else url[:117] + "..."


def url_scheme(url: str) -> str:
    """The lower-cased scheme of `url`, or "" when it has none (a local path). Never raises."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def _forbidden_char(text: str) -> int | None:
    """Index of the first control, format, whitespace or separator character (NUL, CR/LF, tab, space,
    U+2028, U+200B, ...), which no URL may carry unencoded, or None."""
    for i, char in enumerate(text):
        if char.isascii():
            if char <= " " or char == "\x7f":
                return i
        elif unicodedata.category(char)[0] in "CZ":
            return i
    return None


def checked_http_url(url: str, param: str | None, what: str = "the URL") -> httpx.URL:
    """`url` parsed, if it is an http(s) URL this fetcher may use (see the module docstring); else a 400."""
    if len(url) > MAX_URL_CHARS:
        raise bad_request(f"{what} is longer than {MAX_URL_CHARS} characters", param=param)
    bad = _forbidden_char(url)
    if bad is not None:
        raise bad_request(
            f"{what} {shown(url)} has a control or whitespace character (U+{ord(url[bad]):04X}) at {bad}; "
            "percent-encode it",
            param=param,
        )
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
        port = parsed.port
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise bad_request(f"{what} {shown(url)} is malformed: {exc}", param=param) from None
    if parsed.scheme not in ("http", "https"):
        raise bad_request(
            f"{what} {shown(url)} has an unsupported scheme: use https:// or http://", param=param
        )
    problem = _host_problem(host)
    if problem is not None:
        raise bad_request(f"{what} {shown(url)} has an invalid host: {problem}", param=param)
    if port is not None and not 1 <= port <= 65535:
        raise bad_request(f"{what} {shown(url)} has an invalid port {port}: use 1..65535", param=param)
    return parsed


def _host_problem(host: str) -> str | None:
    """Why `host` (IDNA-encoded, as in the URL) cannot be connected to safely, or None."""
    if not host:
        return "it is empty"
    if "%" in host:
        return "percent-encoding (and IPv6 zone ids) are not allowed in hosts"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            return f"not an IPv6 address ({exc})"
        return None
    if len(host) > 253:
        return "longer than 253 characters"
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            return f"the label {label[:70]!r} is empty, longer than 63 characters or has invalid characters"
        if label[:4].lower() == "xn--":
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError) as exc:
                return f"the label {label!r} is not valid IDNA ({exc})"
    if _NUMERIC_LABEL.fullmatch(labels[-1]):  # resolvers read this as an IPv4 address, in any spelling
        try:
            canonical = str(ipaddress.IPv4Address(host.rstrip(".")))
        except ValueError:
            canonical = None
        if canonical != host.rstrip("."):
            return "a numeric host must be a dotted-decimal IPv4 address (no hex, octal or short forms)"
    return None


def _redirect_target(current: httpx.URL, location: str, url: str, param: str | None) -> httpx.URL:
    """The URL a redirect from `current` points to, checked like the original."""
    what = f"the redirect target of {shown(url)}"
    try:
        target = current.join(location)
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise bad_request(f"{what} is malformed: {exc}", param=param) from None
    return checked_http_url(str(target), param, what)


async def _read_limited(resp: httpx.Response, max_bytes: int, url: str, param: str | None) -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(url, max_bytes, param)
    chunks, total = [], 0
    async for chunk in resp.aiter_bytes():  # decoded bytes: a gzip bomb is counted after inflation
        total += len(chunk)
        if total > max_bytes:
            raise too_large(url, max_bytes, param)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_data_url(url: str, *, max_bytes: int, param: str | None = None) -> bytes:
    """`data:[<type>][;base64],<payload>` -> bytes, refusing oversized payloads before decoding them."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request("malformed data URL: no ',' after the media type", param=param)
    if header.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise too_large("the data URL", max_bytes, param)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("malformed data URL: the payload is not valid base64", param=param) from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise too_large("the data URL", max_bytes, param)
    return data

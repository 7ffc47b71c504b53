"""Turn an `image_url` / `video_url` into bytes: `data:` URLs, http(s) URLs and (opt-in) local files.

Remote fetching is a server-side request forgery surface, so it is deny-by-default:
- the host is resolved here and every address checked (private, loopback, link-local, multicast, reserved and
  unspecified ranges are refused unless `allow_private_media_urls`); the connection then goes to the checked
  address itself (Host header and TLS SNI keep the name), so a DNS answer that changes between check and
  connect (rebinding) cannot redirect it;
- redirects are followed by hand, at most `max_media_redirects`, each hop checked again;
- the byte limit is checked against Content-Length and again while streaming (after content decoding), and the
  whole download has a deadline.

Local files are read only from under `allowed_local_media_path`, after resolving symlinks and `..`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import anyio
import httpx

from plm_serve.server.config import ServerConfig
from plm_serve.server.errors import APIError, bad_request

# host, port -> resolved IP addresses (injectable so tests can map names without DNS)
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECTS = (301, 302, 303, 307, 308)
_INLINE_DATA_URL_CHARS = 256 * 1024


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
        scheme = urlsplit(url).scheme.lower()
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
            except httpx.HTTPError as exc:
                raise bad_request(
                    f"could not fetch {url}: {type(exc).__name__}: {exc}", param=param
                ) from None
        if scheme in ("", "file"):
            return await asyncio.to_thread(self._read_local, url, max_bytes, param)
        raise bad_request(f"unsupported URL scheme {scheme!r}: use https://, http:// or data:", param=param)

    # ------------------------------------------------------------------------------------------------ http(s)
    async def _fetch_http(self, url: str, max_bytes: int, param: str | None) -> bytes:
        current = httpx.URL(url)
        for _ in range(self.max_redirects + 1):
            pinned, headers, extensions = await self._pin(current, param)
            async with self.client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
                if resp.status_code in _REDIRECTS and "location" in resp.headers:
                    current = current.join(resp.headers["location"])
                    if current.scheme not in ("http", "https"):
                        raise bad_request(f"{url} redirects to an unsupported URL scheme", param=param)
                    continue
                if resp.status_code != 200:
                    raise bad_request(f"could not fetch {url}: HTTP {resp.status_code}", param=param)
                return await _read_limited(resp, max_bytes, url, param)
        raise bad_request(f"{url}: more than {self.max_redirects} redirects", param=param)

    async def _pin(self, url: httpx.URL, param: str | None) -> tuple[httpx.URL, dict, dict]:
        """Resolve and check `url`'s host; return the URL aimed at a checked address, Host header and SNI."""
        host = url.host
        if not host:
            raise bad_request(f"{url} has no host", param=param)
        try:
            addresses = await self.resolver(host, url.port or (443 if url.scheme == "https" else 80))
        except OSError as exc:
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
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise bad_request(f"file URLs must name a local path, got host {parts.netloc!r}", param=param)
            raw = unquote(parts.path)
        else:
            raw = url
        path = (
            self.local_root / raw
        ).resolve()  # an absolute `raw` replaces the root; both are checked below
        if not path.is_relative_to(self.local_root):
            raise bad_request(
                f"{raw} is outside the allowed media directory", param=param, code="media_url_refused"
            )
        if not path.is_file():
            raise bad_request(f"{raw} is not a readable file", param=param)
        if path.stat().st_size > max_bytes:
            raise too_large(raw, max_bytes, param)
        return path.read_bytes()


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

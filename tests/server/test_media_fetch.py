"""MediaFetcher: data URLs, http(s) with address checks on every hop, byte limits, timeouts, local files."""

from __future__ import annotations

import asyncio
import base64
import os

import httpx
import pytest

from plm_serve.server.config import ServerConfig
from plm_serve.server.errors import APIError
from plm_serve.server.media_fetch import MediaFetcher, decode_data_url, is_public_address

PUBLIC = {"cdn.example": "93.184.216.34", "other.example": "151.101.1.69"}
PRIVATE = {
    "intranet.example": "10.1.2.3",
    "metadata.example": "169.254.169.254",
    "mixed.example": "127.0.0.1",
}


async def fake_resolver(host: str, port: int) -> list[str]:
    if host == "mixed.example":  # one public and one loopback answer: must be refused
        return ["93.184.216.34", "127.0.0.1"]
    table = {**PUBLIC, **PRIVATE}
    if host in table:
        return [table[host]]
    if host.replace(".", "").isdigit() or ":" in host:
        return [host]
    raise OSError(f"unknown host {host}")


def run(coro):
    return asyncio.run(coro)


def fetcher_with(handler, **config) -> MediaFetcher:
    cfg = ServerConfig(model="m", **config)
    return MediaFetcher(cfg, resolver=fake_resolver, transport=httpx.MockTransport(handler))


async def fetch(fetcher: MediaFetcher, url: str, max_bytes: int = 1000) -> bytes:
    try:
        return await fetcher.fetch(url, max_bytes=max_bytes, param="p")
    finally:
        await fetcher.aclose()


def status_of(coro) -> int:
    with pytest.raises(APIError) as info:
        run(coro)
    assert info.value.param == "p"
    return info.value.status_code


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
    ],
)
def test_public_address_classification(address, public):
    assert is_public_address(address) is public


def test_data_urls():
    payload = b"\x89PNG\r\n\x1a\n" + bytes(range(50))
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert decode_data_url(url, max_bytes=1000) == payload
    wrapped = "data:image/png;base64," + "\n".join(
        base64.b64encode(payload).decode()[i : i + 10] for i in range(0, 80, 10)
    )
    assert decode_data_url(wrapped, max_bytes=1000) == payload
    assert decode_data_url("data:text/plain,hello%20world", max_bytes=100) == b"hello world"
    for bad in ("data:image/png;base64", "data:image/png;base64,@@@@"):
        with pytest.raises(APIError) as info:
            decode_data_url(bad, max_bytes=100)
        assert info.value.status_code == 400
    with pytest.raises(APIError) as info:
        decode_data_url(url, max_bytes=10)
    assert info.value.status_code == 413


def test_http_fetch_pins_the_checked_address_and_keeps_the_host_name():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"image-bytes")

    assert run(fetch(fetcher_with(handler), "https://cdn.example/a.png?x=1")) == b"image-bytes"
    (request,) = seen
    assert (
        request.url.host == "93.184.216.34" and request.url.path == "/a.png" and request.url.query == b"x=1"
    )
    assert request.headers["host"] == "cdn.example"
    assert request.extensions["sni_hostname"] == "cdn.example"  # TLS verifies the certificate of the name


@pytest.mark.parametrize(
    "host", ["intranet.example", "metadata.example", "mixed.example", "127.0.0.1", "[::1]"]
)
def test_private_hosts_are_refused_before_connecting(host):
    def handler(request):
        raise AssertionError("must not connect")

    assert status_of(fetch(fetcher_with(handler), f"http://{host}/x.png")) == 400


def test_private_hosts_allowed_by_operator():
    handler = lambda request: httpx.Response(200, content=b"ok")
    assert (
        run(fetch(fetcher_with(handler, allow_private_media_urls=True), "http://intranet.example/x")) == b"ok"
    )


def test_every_redirect_hop_is_checked():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["host"] == "cdn.example":
            return httpx.Response(302, headers={"location": "http://metadata.example/latest/meta-data"})
        raise AssertionError("followed a redirect into a private address")

    assert status_of(fetch(fetcher_with(handler), "https://cdn.example/a.png")) == 400


def test_redirects_are_followed_up_to_the_limit():
    def handler(request: httpx.Request) -> httpx.Response:
        step = int(request.url.path.strip("/") or 0)
        if step < 3:
            host = "other.example" if step % 2 == 0 else "cdn.example"
            return httpx.Response(301, headers={"location": f"https://{host}/{step + 1}"})
        return httpx.Response(200, content=b"final")

    assert run(fetch(fetcher_with(handler, max_media_redirects=3), "https://cdn.example/0")) == b"final"
    assert status_of(fetch(fetcher_with(handler, max_media_redirects=2), "https://cdn.example/0")) == 400
    assert status_of(fetch(fetcher_with(handler), "https://cdn.example/0", max_bytes=1)) == 413


def test_byte_limit_by_header_and_while_streaming():
    declared = lambda request: httpx.Response(200, headers={"content-length": "5000"}, content=b"x" * 5000)
    assert status_of(fetch(fetcher_with(declared), "https://cdn.example/big")) == 413

    async def chunks():
        for _ in range(50):
            yield b"x" * 100

    def undeclared(request):  # chunked: no Content-Length, so only the running count can stop it
        return httpx.Response(200, content=chunks())

    assert status_of(fetch(fetcher_with(undeclared), "https://cdn.example/big")) == 413


def test_http_errors_timeouts_and_bad_hosts_are_400():
    not_found = lambda request: httpx.Response(404)
    assert status_of(fetch(fetcher_with(not_found), "https://cdn.example/missing.png")) == 400
    assert status_of(fetch(fetcher_with(not_found), "https://no-such-host.example/a.png")) == 400
    assert status_of(fetch(fetcher_with(not_found), "gopher://cdn.example/a")) == 400

    async def slow(request):
        await asyncio.sleep(5)
        return httpx.Response(200)

    assert status_of(fetch(fetcher_with(slow, media_fetch_timeout_s=0.2), "https://cdn.example/slow")) == 400


def test_local_files_only_under_the_allowed_directory(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.txt", root / "link.png")
    handler = lambda request: httpx.Response(500)

    def local(url: str, max_bytes: int = 1000, **config):
        return fetch(fetcher_with(handler, allowed_local_media_path=str(root), **config), url, max_bytes)

    assert run(local(str(root / "sub" / "a.png"))) == b"inside"
    assert run(local("sub/a.png")) == b"inside"  # relative to the allowed directory
    assert run(local(f"file://{root}/sub/a.png")) == b"inside"
    for url in (
        "../secret.txt",
        str(tmp_path / "secret.txt"),
        "link.png",
        f"file://{tmp_path}/secret.txt",
        "sub",
    ):
        assert status_of(local(url)) == 400, url
    assert status_of(local("file://otherhost/sub/a.png")) == 400
    assert status_of(local("sub/a.png", max_bytes=3)) == 413
    disabled = fetch(fetcher_with(handler), str(root / "sub" / "a.png"))
    assert status_of(disabled) == 400

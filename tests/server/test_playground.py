"""The playground page at `/`: served from the package with every asset it references, open without the API key,
nothing fetched from another origin, and `--no-playground` turns it off. (The page itself runs in
tests/browser/test_playground.py.)"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from plm_serve.server.__main__ import build_configs, build_parser
from plm_serve.server.playground import ASSETS

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "server" / "static"


def referenced_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_the_page_and_every_asset_it_references_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>plm-serve playground</title>" in page.text
    local = [u for u in referenced_urls(page.text) if u.startswith("/")]
    assert sorted(local) == ["/playground/playground.css", "/playground/playground.js"]
    for url in local:
        resp = client.get(url)
        assert resp.status_code == 200, url
        assert resp.headers["content-type"] == ASSETS[url.rsplit("/", 1)[1]]
        assert resp.content == (STATIC / url.rsplit("/", 1)[1]).read_bytes()
        assert resp.headers["x-content-type-options"] == "nosniff"


def test_nothing_is_loaded_from_another_origin():
    """No CDN: the page references same-origin paths, data: and fragments only, and the CSP (checked in the
    browser test too) forbids anything else."""
    html = (STATIC / "index.html").read_text()
    for url in referenced_urls(html):
        assert url.startswith(("/", "#", "data:")) and not url.startswith("//"), url
    for name in ASSETS:
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
        assert "@import" not in text and "url(" not in text, name


def test_the_csp_allows_the_same_origin_only(client):
    csp = client.get("/").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == directives["connect-src"] == "'self'"


def test_the_page_loads_without_the_api_key_the_api_still_needs_it(make_client):
    client = make_client(api_key="secret")
    assert client.get("/").status_code == 200
    assert client.get("/playground/playground.js").status_code == 200
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


@pytest.mark.parametrize("name", ["index.html", "missing.js", "..%2Fapp.py", "%2E%2E"])
def test_unknown_assets_are_404_with_an_openai_body(client, name):
    resp = client.get(f"/playground/{name}")
    assert resp.status_code == 404
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_turned_off_there_is_no_page(make_client):
    client = make_client(playground=False)
    for path in ("/", "/playground/playground.js"):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", path
    assert client.get("/v1/models").status_code == 200


def test_the_flag(ckpt_l):
    parse = build_parser().parse_args
    assert build_configs(parse(["--model", str(ckpt_l)]), {}).playground is True
    assert build_configs(parse(["--model", str(ckpt_l), "--no-playground"]), {}).playground is False
    assert build_configs(parse(["--model", str(ckpt_l), "--playground"]), {}).playground is True


def test_every_static_file_ships_in_the_wheel():
    """Package data: each file of server/static/ matches a `plm_serve.server` pattern of pyproject.toml."""
    # (a regex rather than tomllib, which Python 3.10 lacks)
    line = re.search(r'^"plm_serve\.server" = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert line, "no package-data entry for plm_serve.server in pyproject.toml"
    patterns = re.findall(r'"([^"]+)"', line[1])
    files = sorted(p.relative_to(ROOT / "server").as_posix() for p in STATIC.iterdir())
    assert sorted(files) == sorted(f"static/{name}" for name in ASSETS)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name

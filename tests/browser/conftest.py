"""Browser-test fixtures: a live server (real engine, tiny checkpoint, an API key) and headless Chromium driven
through chromedriver.

Why selenium + chromedriver rather than playwright: Debian builds `chromium-driver` from the same source and
version as `chromium`, so the driver always speaks the installed browser's protocol; playwright is built
against its own Chromium revision (a newer one than Debian's) and supports other builds only on a best-effort
basis. Selenium is pure Python and is told where the driver is, so it never downloads anything.

Without Chromium installed the browser tests are skipped with the command that installs it (`.ci/run` runs
that command, so CI always runs them).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from plm_serve.engine import AsyncEngine, EngineConfig
from plm_serve.processors import Processor
from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import serving_in_thread

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
NO_CHROMIUM = (
    None
    if CHROMIUM and CHROMEDRIVER
    else "Chromium is not installed (needs `chromium` and `chromedriver` on PATH): "
    "apt-get install -y chromium chromium-driver (.ci/run installs them)"
)
# The network here is closed: without these, Chromium keeps trying its background services (updates, sync,
# QUIC probes) and stalls on them. --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "playground-test-key"
MODEL = "plm-tiny"


@dataclass
class Live:
    base_url: str
    engine: AsyncEngine | FakeEngine


@pytest.fixture(scope="session")
def live(ckpt_l) -> Iterator[Live]:
    """The real engine on the tiny checkpoint, behind an API key."""
    engine = AsyncEngine.from_config(
        EngineConfig(
            model=str(ckpt_l),
            device="cpu",
            dtype="float32",
            max_model_len=4096,
            num_kv_blocks=512,
            max_num_batched_tokens=4096,
        )
    )
    config = ServerConfig(model=str(ckpt_l), served_model_name=MODEL, api_key=API_KEY)
    try:
        with serving_in_thread(create_app(config, engine)) as base_url:
            yield Live(base_url, engine)
    finally:
        asyncio.run(engine.shutdown(1.0))


@pytest.fixture(scope="session")
def failing_live(ckpt_l) -> Iterator[Live]:
    """A scripted engine whose generation fails at its fourth token (the error arrives inside the stream)."""
    engine = FakeEngine(error_at_step=3, step_delay_s=0.02)
    config = ServerConfig(model=str(ckpt_l), served_model_name=MODEL)
    with serving_in_thread(
        create_app(config, engine, processor=Processor.from_pretrained(ckpt_l))
    ) as base_url:
        yield Live(base_url, engine)


@pytest.fixture(scope="session")
def browser(tmp_path_factory, screenshots) -> Iterator[webdriver.Chrome]:
    if NO_CHROMIUM:
        pytest.skip(NO_CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir for every run
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


_screenshot_folders: list[Path] = []


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Screenshots land in pytest's temp folder (kept for the last 3 runs, never in the repository); the end
    of the run's summary says where."""
    folder = tmp_path_factory.mktemp("playground-screenshots", numbered=False)
    _screenshot_folders.append(folder)
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed and "browser" in item.fixturenames:
        _save_failure(item)
    return report


def _save_failure(item) -> None:
    """A failed browser test leaves what the page showed (screenshot and DOM) beside the screenshots."""
    driver = item.funcargs["browser"]
    folder = item.funcargs["screenshots"]
    try:
        driver.save_screenshot(str(folder / f"failed-{item.name}.png"))
        (folder / f"failed-{item.name}.html").write_text(driver.page_source)
    except Exception as exc:  # the browser itself may be what failed
        (folder / f"failed-{item.name}.txt").write_text(f"no screenshot: {exc!r}")


def pytest_terminal_summary(terminalreporter) -> None:
    for folder in _screenshot_folders:
        names = ", ".join(sorted(p.name for p in folder.iterdir()))
        if names:
            terminalreporter.write_line(f"playground screenshots ({names}): {folder}")

"""The playground in headless Chromium against a live server: pick, drop and paste media, stream answers over a
multi-turn conversation, show the server's own error messages, and stay accessible and usable at phone and
desktop sizes.

The page's requests are recorded (a wrapper around `fetch`, installed before the page's script runs) and
replayed with httpx, so every answer, token count and error shown is compared with what the API itself returns
for exactly that request.
"""

from __future__ import annotations

import base64
import json
import re

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.browser.conftest import API_KEY
from tests.server import media

PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}

# Runs before the page's own script: records each request body and every change of the answer being streamed.
RECORDER = """
window.__sent = [];
const realFetch = window.fetch.bind(window);
window.fetch = (url, init = {}) => {
  window.__sent.push({url: String(url), body: init.body || null});
  return realFetch(url, init);
};
window.__updates = [];
document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("log");
  new MutationObserver(() => {
    const answers = log.querySelectorAll(".turn.assistant .text");
    if (answers.length) window.__updates.push({
      length: answers[answers.length - 1].textContent.length, busy: log.getAttribute("aria-busy"),
    });
  }).observe(log, {subtree: true, childList: true, characterData: true});
});
"""

# Drops or pastes one file (bytes in base64) the way the browser delivers a real one: a DataTransfer of Files.
DELIVER = """
const [how, b64, name, type] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], name, {type}));
const target = document.getElementById("prompt");
if (how === "drop") {
  for (const kind of ["dragenter", "dragover", "drop"]) {
    target.dispatchEvent(new DragEvent(kind, {bubbles: true, cancelable: true, dataTransfer: data}));
  }
} else {
  target.dispatchEvent(new ClipboardEvent("paste", {bubbles: true, cancelable: true, clipboardData: data}));
}
"""

# WCAG 2 contrast of every visible text against the first opaque background behind it.
CONTRAST = """
const lum = (rgb) => {
  const [r, g, b] = rgb.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const parse = (c) => c.match(/[\\d.]+/g).map(Number);
const background = (node) => {
  for (; node; node = node.parentElement) {
    const c = parse(getComputedStyle(node).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
  }
  return [255, 255, 255];
};
const worst = [];
for (const node of document.querySelectorAll("body *")) {
  const own = [...node.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  const box = node.getBoundingClientRect();
  if (!own || box.width === 0 || node.closest(".visually-hidden")) continue;
  const fg = lum(parse(getComputedStyle(node).color).slice(0, 3));
  const bg = lum(background(node));
  const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
  if (ratio < 4.5) worst.push(`${node.tagName}.${node.className} "${node.textContent.trim().slice(0, 30)}": ${ratio.toFixed(2)}`);
}
return worst;
"""

# Form controls a person can reach, each with the name a screen reader announces.
UNLABELLED = """
return [...document.querySelectorAll("input, select, textarea, button, summary")]
  .filter((c) => c.getAttribute("aria-hidden") !== "true" && c.getClientRects().length)
  .filter((c) => !((c.labels && c.labels.length) || c.getAttribute("aria-label") || c.textContent.trim()))
  .map((c) => c.outerHTML.slice(0, 80));
"""


def open_page(driver: WebDriver, base_url: str, viewport: dict) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", viewport)
    driver.get(f"{base_url}/version")  # same origin: clear what an earlier test left in this tab's session
    driver.execute_script("sessionStorage.clear()")
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    try:
        driver.get(f"{base_url}/")
    finally:
        driver.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
        )
    wait_for(driver, lambda d: d.find_element(By.ID, "model-status").text != "Connecting to the server…")


def wait_for(driver: WebDriver, condition, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_id(driver: WebDriver, element_id: str):
    return driver.find_element(By.ID, element_id)


def deliver(driver: WebDriver, how: str, data: bytes, name: str, mime: str) -> None:
    driver.execute_script(DELIVER, how, base64.b64encode(data).decode(), name, mime)


def send_prompt(driver: WebDriver, text: str) -> None:
    """Type a message and press Enter, with the record of answer updates started afresh."""
    driver.execute_script("window.__updates.length = 0")
    by_id(driver, "prompt").send_keys(text, Keys.ENTER)


def wait_idle(driver: WebDriver) -> None:
    """Until the answer (or the error) is in: the log is no longer busy and Send is enabled again."""
    wait_for(
        driver,
        lambda d: by_id(d, "log").get_attribute("aria-busy") == "false" and by_id(d, "send").is_enabled(),
    )


def last_request(driver: WebDriver) -> dict:
    sent = [s for s in driver.execute_script("return window.__sent") if s["url"] == "/v1/chat/completions"]
    return json.loads(sent[-1]["body"])


def replay(base_url: str, body: dict, api_key: str | None = API_KEY) -> httpx.Response:
    """The page's request as a plain (non-streamed) call: the answer the page should have shown."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def shown_error(status: int | None, error: dict) -> str:
    """How the page words an OpenAI error body: status (None: inside a stream), type and code, then the
    server's message verbatim."""
    first = f"Error {status}" if status else "Error in the stream"
    head = " · ".join(str(x) for x in (first, error["type"], error["code"]) if x)
    return f"{head}\n{error['message']}" + (f"\n(param: {error['param']})" if error["param"] else "")


def answers(driver: WebDriver) -> list[str]:
    """The answers as the page holds them (textContent: exact, unlike the rendered text)."""
    elements = driver.find_elements(By.CSS_SELECTOR, "#log .turn.assistant .text")
    return [e.get_property("textContent") for e in elements]


STATS = re.compile(
    r"^(?P<tokens>\d+) tokens · (?P<rate>[\d.]+) tokens/s · time to first token (?P<ttft>\d+) ms · "
    r"prompt (?P<prompt>\d+) tokens"
)


def check_answer(driver: WebDriver, base_url: str) -> dict:
    """The last answer equals the API's answer to the recorded request, it arrived in several updates while
    the log was aria-busy, and the stats line carries the API's token counts."""
    body = last_request(driver)
    expected = replay(base_url, body)
    assert expected.status_code == 200, expected.text
    want = expected.json()
    assert answers(driver)[-1] == want["choices"][0]["message"]["content"]
    updates = driver.execute_script("return window.__updates.splice(0)")
    lengths = [u["length"] for u in updates if u["busy"] == "true"]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"not streamed: {updates}"
    stats = STATS.match(by_id(driver, "stats").text)
    assert stats, by_id(driver, "stats").text
    assert int(stats["tokens"]) == want["usage"]["completion_tokens"]
    assert int(stats["prompt"]) == want["usage"]["prompt_tokens"]
    assert float(stats["rate"]) > 0 and int(stats["ttft"]) >= 0
    return body


def check_accessible_and_fits(driver: WebDriver) -> None:
    assert driver.execute_script(UNLABELLED) == []
    assert driver.execute_script(CONTRAST) == []
    width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"horizontal scrolling: content {width[0]} px wide in a {width[1]} px window"
    log = by_id(driver, "log")
    assert (
        log.get_attribute("aria-live") == "polite" and by_id(driver, "error").get_attribute("role") == "alert"
    )


def check_console(driver: WebDriver, base_url: str) -> None:
    """No script error, no CSP violation, and every resource came from the server itself."""
    problems = [
        e["message"]
        for e in driver.get_log("browser")
        if "Failed to load resource: the server responded with a status of" not in e["message"]
    ]
    assert not [p for p in problems if "Uncaught" in p or "Content Security Policy" in p], problems
    origins = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert origins and all(u.startswith((base_url, "data:", "blob:")) for u in origins), origins


def test_desktop_conversation_with_a_wrong_then_the_right_api_key(browser, live, tmp_path, screenshots):
    open_page(browser, live.base_url, DESKTOP)
    assert by_id(browser, "settings").get_attribute("open") is not None  # the settings sidebar is unfolded
    refused = httpx.get(f"{live.base_url}/v1/models").json()["error"]["message"]
    assert by_id(browser, "model-status").text == f"Model unknown: {refused}"
    check_accessible_and_fits(browser)

    # Keyboard only: the skip link is the first stop and lands in the prompt.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Skip to the prompt"
    outline = browser.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"  # a visible focus ring
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    assert browser.switch_to.active_element.get_attribute("id") == "prompt"

    # A wrong key: the server's 401 is shown as it words it, and the message goes back to the composer.
    by_id(browser, "api-key").send_keys("not-the-key")
    photo = tmp_path / "photo.png"
    photo.write_bytes(media.png(500, 450, seed=5))
    by_id(browser, "file").send_keys(str(photo))  # the native file picker's input
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#attachments .name")] == ["photo.png"]
    Select(by_id(browser, "detail")).select_by_value("low")
    prompt = by_id(browser, "prompt")
    send_prompt(browser, "What is in this picture?")
    wait_for(browser, lambda d: by_id(d, "error").text)
    wait_idle(browser)
    wrong = replay(live.base_url, last_request(browser), api_key="not-the-key")
    assert wrong.status_code == 401
    error = wrong.json()["error"]
    assert by_id(browser, "error").text == shown_error(401, error)
    assert answers(browser) == [] and prompt.get_attribute("value") == "What is in this picture?"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attachments li")) == 1

    # The right key: the answer streams in.
    key = by_id(browser, "api-key")
    key.clear()
    key.send_keys(API_KEY, Keys.TAB)  # leaving the field re-reads the model
    wait_for(browser, lambda d: by_id(d, "model-status").text.startswith("Model: plm-tiny · context 4,096"))
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("24")
    send_prompt(browser, "")  # the message is still in the composer
    wait_idle(browser)
    assert by_id(browser, "error").text == ""
    first = check_answer(browser, live.base_url)
    (part_image, part_text) = first["messages"][0]["content"]
    assert part_image == {
        "type": "image_url",
        "image_url": {"url": media.data_url(photo.read_bytes()), "detail": "low"},
    }
    assert part_text == {"type": "text", "text": "What is in this picture?"}
    assert first["stream_options"] == {"include_usage": True} and first["max_tokens"] == 24
    assert "temperature" not in first and "seed" not in first  # empty fields: the server's defaults
    assert browser.execute_script("return sessionStorage.getItem('plm-serve.api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0

    # A second turn, sampled: the whole conversation goes again, with the first answer as the assistant's.
    by_id(browser, "temperature").send_keys("0.8")
    by_id(browser, "seed").send_keys("7")
    send_prompt(browser, "And the colours?")
    wait_idle(browser)
    second = check_answer(browser, live.base_url)
    assert second["messages"][:1] == first["messages"]
    assert second["messages"][1] == {"role": "assistant", "content": answers(browser)[0]}
    assert second["messages"][2] == {"role": "user", "content": "And the colours?"}
    assert second["temperature"] == 0.8 and second["seed"] == 7
    assert browser.switch_to.active_element.get_attribute("id") == "prompt"  # ready for the next message
    check_accessible_and_fits(browser)
    assert browser.save_screenshot(str(screenshots / "desktop.png"))
    check_console(browser, live.base_url)

    by_id(browser, "new-chat").click()
    assert answers(browser) == [] and by_id(browser, "stats").text == ""


def test_phone_drop_paste_video_and_an_over_long_prompt(browser, live, screenshots):
    open_page(browser, live.base_url, PHONE)
    settings = by_id(browser, "settings")
    assert settings.get_attribute("open") is None  # folded: the conversation gets the screen
    settings.find_element(By.TAG_NAME, "summary").click()
    by_id(browser, "api-key").send_keys(API_KEY)
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("16")
    settings.find_element(By.TAG_NAME, "summary").click()
    check_accessible_and_fits(browser)

    deliver(browser, "drop", media.png(320, 240, seed=1), "dropped.png", "image/png")
    deliver(browser, "paste", media.png(64, 64, seed=2), "pasted.png", "image/png")
    deliver(browser, "drop", b"%PDF-1.4", "notes.pdf", "application/pdf")
    assert by_id(browser, "error").text == "Error\nNot an image or a video: notes.pdf"
    deliver(browser, "drop", media.mp4(num_frames=4, seed=3), "clip.mp4", "video/mp4")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#attachments .name")]
    assert names == ["dropped.png", "pasted.png", "clip.mp4"]
    browser.find_element(By.CSS_SELECTOR, "[aria-label='Remove pasted.png']").send_keys(Keys.ENTER)
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#attachments .name")]
    assert names == ["dropped.png", "clip.mp4"]

    browser.execute_script("window.__updates.length = 0")
    by_id(browser, "prompt").send_keys("Describe both.")
    by_id(browser, "send").click()
    wait_idle(browser)
    body = check_answer(browser, live.base_url)
    kinds = [part["type"] for part in body["messages"][0]["content"]]
    assert kinds == ["image_url", "video_url", "text"]
    assert body["messages"][0]["content"][1]["video_url"]["url"].startswith("data:video/mp4;base64,")

    # Over the context length: the server's 400, word for word, and nothing added to the conversation.
    too_long = "lorem ipsum " * 3000
    browser.execute_script("document.getElementById('prompt').value = arguments[0]", too_long)
    by_id(browser, "send").click()
    wait_for(browser, lambda d: by_id(d, "error").text)
    wait_idle(browser)
    refused = replay(live.base_url, last_request(browser))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "prompt_too_long_error"
    assert by_id(browser, "error").text == shown_error(400, error)
    assert len(answers(browser)) == 1
    assert by_id(browser, "prompt").get_attribute("value") == too_long  # back as typed, to shorten it
    check_accessible_and_fits(browser)
    assert browser.save_screenshot(str(screenshots / "phone.png"))
    check_console(browser, live.base_url)


def test_stop_keeps_the_partial_answer_and_frees_the_engine(browser, live):
    open_page(browser, live.base_url, DESKTOP)
    by_id(browser, "api-key").send_keys(API_KEY)
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("3000")
    by_id(browser, "temperature").send_keys("5")  # out of range: the server's validation message
    send_prompt(browser, "Tell me a long story.")
    wait_for(browser, lambda d: by_id(d, "error").text)
    wait_idle(browser)
    refused = replay(live.base_url, last_request(browser))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"
    assert by_id(browser, "error").text == shown_error(400, refused.json()["error"])
    by_id(browser, "temperature").clear()
    send_prompt(browser, "")  # the message is back in the composer
    wait_for(browser, lambda d: len("".join(answers(d))) > 20)
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)  # or the Stop button
    wait_idle(browser)
    assert by_id(browser, "error").text == ""
    assert browser.find_element(By.CSS_SELECTOR, "#log .turn.assistant .note").text == "(stopped)"
    assert re.fullmatch(r"time to first token \d+ ms · stopped by you", by_id(browser, "stats").text)
    wait_for(browser, lambda _: not live.engine.core.has_unfinished(), timeout=5)  # the server aborted it
    partial = answers(browser)[-1]

    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("8")
    send_prompt(browser, "Go on.")
    wait_idle(browser)
    body = check_answer(browser, live.base_url)
    assert body["messages"][0] == {"role": "user", "content": "Tell me a long story."}  # text only: a string
    assert body["messages"][1] == {"role": "assistant", "content": partial}
    check_console(browser, live.base_url)


def test_an_error_inside_the_stream_is_shown_and_the_partial_answer_kept(browser, failing_live):
    open_page(browser, failing_live.base_url, DESKTOP)
    assert by_id(browser, "model-status").text == "Model: plm-tiny · context 4,096 tokens"  # no key needed
    send_prompt(browser, "Hello")
    wait_idle(browser)
    with httpx.stream(
        "POST", f"{failing_live.base_url}/v1/chat/completions", json=last_request(browser), timeout=30
    ) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    *chunks, failure = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed and answers(browser) == [streamed]
    assert by_id(browser, "error").text == shown_error(None, failure["error"])
    note = browser.find_element(By.CSS_SELECTOR, "#log .turn.assistant .note").text
    assert note == "(cut off by the error shown below)"
    assert by_id(browser, "stats").text.endswith(" · cut off by an error")

    send_prompt(browser, "Again")
    wait_idle(browser)
    assert last_request(browser)["messages"][:2] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": streamed},
    ]
    check_console(browser, failing_live.base_url)

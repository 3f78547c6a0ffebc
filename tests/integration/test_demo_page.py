"""The demo page at ``GET /``, end to end in headless Chromium.

A real voxrelay (echo chat + embedded espeak) runs in a background thread with its own
event loop; Selenium drives the page that the WebSocket door serves, and reads the
page's state from ``window.voxrelay``. Skipped when Chromium or chromedriver is not
installed (CI installs the Debian packages ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# The driver path is given explicitly; Selenium Manager must never go online for one.
os.environ.setdefault("SE_OFFLINE", "true")

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs /usr/bin/chromium and /usr/bin/chromedriver: `make test-deps` installs them",
    ),
    pytest.mark.timeout(180),
]

SENTENCES = [
    "Hello there, this is the voxrelay demo page.",
    "Every sentence is spoken as soon as it has been written.",
    "This is the last sentence of the test.",
]
STATE = "return window.voxrelay"


class ServerThread:
    """voxrelay's real App on an event loop of its own, for a synchronous test."""

    def __init__(self, **overrides: Any) -> None:
        self.overrides = overrides
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="voxrelay", daemon=True)
        self.app: Any = None

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> int:
        from voxrelay.gateways.app import App
        from voxrelay.service.settings import Settings

        values: dict[str, Any] = dict(
            host="127.0.0.1",
            grpc_port=0,
            ws_port=0,
            metrics_port=0,
            http_port=0,
            llm="echo",
            tts="espeak",
            api_keys=[],
            allowed_origins=[],
        )
        values.update(self.overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]

        async def boot() -> Any:
            app = App(settings)  # built on the server's loop
            await app.start()
            return app

        self.thread.start()
        self.app = self.run(boot())
        return int(self.app.ws_port)

    def stop(self) -> None:
        try:
            if self.app is not None:
                self.run(self.app.drain_and_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ServerThread()
    try:
        port = server.start()
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    profile = tempfile.mkdtemp(prefix="voxrelay-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports land there
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: Any, timeout: float = 60, poll: float = 0.05) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=poll)


def open_page(driver: Any, url: str, *, text: str, mode: str, fmt: str) -> None:
    driver.get(url)
    wait(driver, 15).until(lambda d: d.execute_script(STATE) is not None)
    assert driver.title == "voxrelay"
    area = driver.find_element(By.ID, "text")
    area.clear()
    area.send_keys(text)
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    Select(driver.find_element(By.ID, "format")).select_by_value(fmt)


def click(driver: Any, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def wait_done(driver: Any, timeout: float = 60) -> dict[str, Any]:
    """Wait until the stream finished or failed; return the page state."""
    wait(driver, timeout).until(
        lambda d: d.execute_script("const v = window.voxrelay; return !!(v.finished || v.error);")
    )
    state: dict[str, Any] = driver.execute_script(STATE)
    assert state["error"] is None, f"the page reported an error: {state['error']}"
    return state


def status_text(driver: Any) -> str:
    return str(driver.find_element(By.ID, "statusText").text)


def test_speak_pcm_plays_and_shows_segments(browser: Any, base_url: str) -> None:
    open_page(browser, base_url, text=" ".join(SENTENCES), mode="speak", fmt="pcm")
    click(browser, "speak")
    state = wait_done(browser)

    assert state["state"] == "finished"
    assert state["bytesReceived"] > 0
    assert state["framesReceived"] >= 1
    assert state["playbackStarted"] is True
    assert state["ttfaMs"] is not None and state["ttfaMs"] > 0
    finished = state["finished"]
    assert finished["audio_bytes"] == state["bytesReceived"]
    assert finished["segments"] == len(state["segments"])

    # The segments are the sentences, in order, with their audio positions rising.
    segments = state["segments"]
    assert [s["index"] for s in segments] == list(range(len(segments)))
    assert [s["text"].strip() for s in segments] == SENTENCES
    starts = [s["start_ms"] for s in segments]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] > 0

    # The transcript lists them and marks the one being heard (or, once over, all as heard).
    wait(browser, 20).until(
        lambda d: d.execute_script(
            "return document.querySelector('#transcript li.now') !== null"
            " || document.querySelectorAll('#transcript li.done').length"
            " === window.voxrelay.segments.length"
        )
    )
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#transcript li")]
    assert len(items) == len(SENTENCES)
    assert all(sentence in item for sentence, item in zip(SENTENCES, items, strict=True))
    assert status_text(browser).startswith("Finished")
    assert "ms" in browser.find_element(By.ID, "mTtfa").text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "demo_page.png"))


def test_chat_mp3_streams_through_media_source(browser: Any, base_url: str) -> None:
    text = "Tell me something nice. Keep it short."
    open_page(browser, base_url, text=text, mode="chat", fmt="mp3")
    supported = browser.execute_script(
        "return !!(window.MediaSource && MediaSource.isTypeSupported('audio/mpeg'))"
    )
    # Ctrl+Enter in the text area speaks, like the button.
    browser.find_element(By.ID, "text").send_keys(Keys.CONTROL, Keys.ENTER)
    state = wait_done(browser)

    assert state["state"] == "finished"
    assert state["bytesReceived"] > 0 and state["framesReceived"] >= 1
    assert state["finished"]["audio_bytes"] == state["bytesReceived"]
    assert state["segments"], "chat mode showed no segments"
    # echo answers with the caller's own words.
    spoken = " ".join(s["text"].strip() for s in state["segments"])
    assert re.sub(r"\s+", " ", spoken) == text
    if supported:
        wait(browser, 20).until(
            lambda d: d.execute_script("return window.voxrelay.playbackStarted")
        )
    else:
        assert "once complete" in status_text(browser)


def test_speak_opus_plays_in_the_browser(browser: Any, base_url: str) -> None:
    """The browser's own decoder takes voxrelay's Ogg pages: through MediaSource where it
    streams Ogg Opus, else decoded whole once the stream is complete."""
    open_page(browser, base_url, text=" ".join(SENTENCES), mode="speak", fmt="opus")
    click(browser, "speak")
    state = wait_done(browser)

    assert state["state"] == "finished"
    assert state["finished"]["audio_bytes"] == state["bytesReceived"] > 0
    wait(browser, 20).until(lambda d: d.execute_script("return window.voxrelay.playbackStarted"))
    assert browser.execute_script("return window.voxrelay.error") is None


def test_stop_mid_stream_cancels(browser: Any, base_url: str) -> None:
    # Long enough that the stream is still in flight when Stop lands: ~3 minutes of speech,
    # which espeak + the mp3 encoder take seconds to make. (With pcm the whole stream is
    # sent in well under a second, faster than a WebDriver round trip.)
    text = " ".join(
        f"This is sentence number {i} of a long text that nobody will hear to the end."
        for i in range(1, 46)
    )
    open_page(browser, base_url, text=text, mode="speak", fmt="mp3")
    click(browser, "speak")
    wait(browser, 30, poll=0.01).until(
        lambda d: d.execute_script("return window.voxrelay.framesReceived > 0")
    )
    click(browser, "stop")
    wait(browser, 30).until(
        lambda d: d.execute_script("const v = window.voxrelay; return v.state !== 'stopping';")
    )
    state = browser.execute_script(STATE)
    assert state["state"] == "cancelled", state
    assert state["finished"] is None and state["error"] is None
    assert state["bytesReceived"] > 0
    assert state["playing"] is False
    assert status_text(browser).startswith("Stopped")
    # Speak is usable again, Stop is not.
    assert browser.find_element(By.ID, "speak").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()


def test_stop_silences_pcm_playback(browser: Any, base_url: str) -> None:
    # The stream is sent long before it has been heard; Stop must silence what is scheduled.
    text = " ".join(f"Sentence {i} is still waiting to be heard." for i in range(1, 9))
    open_page(browser, base_url, text=text, mode="speak", fmt="pcm")
    click(browser, "speak")
    state = wait_done(browser)
    assert state["state"] == "finished" and state["playing"] is True
    click(browser, "stop")
    state = browser.execute_script(STATE)
    assert state["playing"] is False
    assert state["state"] == "finished" and state["error"] is None
    assert status_text(browser).startswith("Stopped")  # "Stopped at 0.4 s of 12.0 s."
    assert not browser.find_element(By.ID, "stop").is_enabled()


def test_a_refusal_reads_well_and_leaves_the_page_usable(browser: Any, base_url: str) -> None:
    open_page(browser, base_url, text="Hello.", mode="speak", fmt="pcm")
    browser.find_element(By.ID, "voice").send_keys("nobody")
    click(browser, "speak")
    wait(browser, 30).until(lambda d: d.execute_script("return window.voxrelay.error !== null"))
    state = browser.execute_script(STATE)
    assert state["state"] == "error" and state["error"]["code"] == "invalid_request"
    text = status_text(browser)
    assert "nobody" in text and "Error: invalid_request" not in text  # a sentence, then the code
    assert browser.find_element(By.CSS_SELECTOR, "#status code").text == "invalid_request"
    assert "Nothing was spoken" in browser.find_element(By.ID, "transcript").text
    assert browser.find_element(By.ID, "speak").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()
    # An open server never shows the API-key field.
    assert not browser.find_element(By.ID, "keyRow").is_displayed()


def test_mobile_width_fits_without_sideways_scrolling(browser: Any, base_url: str) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        open_page(browser, base_url, text="Hello there. Short and sweet.", mode="speak", fmt="pcm")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390
        speak = browser.find_element(By.ID, "speak").rect
        stop = browser.find_element(By.ID, "stop").rect
        assert speak["x"] >= 0 and stop["x"] + stop["width"] <= 390
        assert speak["width"] >= 120  # a button a thumb can hit
        click(browser, "speak")
        assert wait_done(browser)["state"] == "finished"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "demo_page_mobile.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    server = ServerThread(api_keys=["k1"])
    try:
        port = server.start()
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.stop()


def test_api_key_field_appears_when_the_server_requires_one(browser: Any, keyed_url: str) -> None:
    open_page(browser, keyed_url, text="Hello there.", mode="speak", fmt="pcm")
    key_row = browser.find_element(By.ID, "keyRow")
    assert not key_row.is_displayed()  # nothing to fill in until the server asks

    click(browser, "speak")
    wait(browser, 30).until(lambda d: d.execute_script("return window.voxrelay.error !== null"))
    state = browser.execute_script(STATE)
    assert state["error"]["code"] == "unauthorized" and state["needsKey"] is True
    assert key_row.is_displayed()
    assert "requires an API key" in status_text(browser)
    assert browser.switch_to.active_element.get_attribute("id") == "key"

    key = browser.find_element(By.ID, "key")
    key.send_keys("wrong")
    click(browser, "speak")
    wait(browser, 30).until(lambda d: d.execute_script("return window.voxrelay.error !== null"))
    assert "refused this API key" in status_text(browser)

    key.clear()
    key.send_keys("k1", Keys.ENTER)  # Enter in the key field speaks too
    state = wait_done(browser)
    assert state["state"] == "finished" and state["bytesReceived"] > 0


def policy_reports(driver: Any) -> list[str]:
    """Return the console lines since the last call that come from the page's CSP."""
    return [
        str(entry.get("message", ""))
        for entry in driver.get_log("browser")
        if "Content Security Policy" in str(entry.get("message", ""))
    ]


def test_the_page_keeps_to_its_policy_and_no_site_can_frame_it(browser: Any, base_url: str) -> None:
    policy_reports(browser)  # forget what earlier tests logged
    open_page(
        browser, base_url, text="Hello there. The policy lets me speak.", mode="speak", fmt="pcm"
    )
    click(browser, "speak")
    assert wait_done(browser)["state"] == "finished"
    open_page(browser, base_url, text="And through MediaSource too.", mode="speak", fmt="mp3")
    click(browser, "speak")
    assert wait_done(browser)["state"] == "finished"
    assert policy_reports(browser) == []

    # Another site's page that frames the demo gets Chromium's error page in its frame.
    with framing_site(base_url) as site:
        browser.get(site)
        try:
            browser.switch_to.frame("f")
            wait(browser, 15).until(
                lambda d: d.execute_script(
                    "return document.URL !== 'about:blank' && document.readyState === 'complete'"
                )
            )
            assert browser.execute_script("return typeof window.voxrelay") == "undefined"
            assert not browser.find_elements(By.ID, "speak")
        finally:
            browser.switch_to.default_content()


@contextmanager
def framing_site(target: str) -> Iterator[str]:
    """Serve, from another origin, a page that frames *target*; yield its URL."""
    page = f"<!doctype html><title>framer</title><iframe id=f src='{target}'></iframe>".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_type_to_speak_speaks_each_sentence_while_typing(browser: Any, base_url: str) -> None:
    open_page(browser, base_url, text="", mode="type", fmt="pcm")
    area = browser.find_element(By.ID, "text")
    area.send_keys("Hello there, this is typed. A")
    # The first sentence is spoken while the second is still being typed.
    wait(browser, 30).until(lambda d: d.execute_script("return window.voxrelay.segments.length"))
    state = browser.execute_script(STATE)
    assert [s["text"] for s in state["segments"]] == ["Hello there, this is typed."]
    assert state["state"] == "streaming" and browser.find_element(By.ID, "speak").text == "End"
    area.send_keys("nd this is more, with no full stop")
    area.send_keys(Keys.CONTROL, Keys.ENTER)  # ends the text: the rest is spoken
    state = wait_done(browser)
    assert [s["text"] for s in state["segments"]] == [
        "Hello there, this is typed.",
        "And this is more, with no full stop",
    ]
    assert state["finished"]["reply_text"] == (
        "Hello there, this is typed. And this is more, with no full stop"
    )
    assert state["bytesReceived"] == state["finished"]["audio_bytes"] > 0
    # Typing again starts a new stream; Speak with the text as it stands speaks it whole.
    area.send_keys(" Again.")
    wait(browser, 30).until(
        lambda d: d.execute_script("return window.voxrelay.state") in ("streaming", "finished")
    )
    click(browser, "speak")
    state = wait_done(browser)
    assert [s["text"] for s in state["segments"]] == ["Again."]


def test_the_word_being_heard_is_highlighted(browser: Any, base_url: str) -> None:
    open_page(browser, base_url, text=" ".join(SENTENCES), mode="speak", fmt="pcm")
    click(browser, "speak")
    wait_done(browser)
    wait(browser, 30).until(lambda d: d.execute_script("return window.voxrelay.wordNow !== null"))
    # While it plays, the highlighted word is the last one begun at the playback position.
    seen: list[dict[str, Any]] = []
    for _ in range(20):
        sample = browser.execute_script(
            "const v = window.voxrelay; const n = document.querySelector('#transcript .w.now');"
            " return v.wordNow && n ? { now: v.wordNow, shown: n.textContent, words: v.words }"
            " : null;"
        )
        if sample is None:
            break
        seen.append(sample)
    assert seen, "no word was highlighted while the audio played"
    for sample in seen:
        now, words = sample["now"], sample["words"]
        begun = [w for w in words if w["start_ms"] <= now["pos"]]
        assert sample["shown"] == now["text"] == begun[-1]["text"]
    words = seen[0]["words"]
    assert [w["text"] for w in words[:3]] == [w.strip(",.") for w in SENTENCES[0].split()[:3]]


def test_stop_says_what_was_heard(browser: Any, base_url: str) -> None:
    text = " ".join(
        f"This is sentence number {i} of a long text that nobody will hear to the end."
        for i in range(1, 46)
    )
    open_page(browser, base_url, text=text, mode="speak", fmt="mp3")
    click(browser, "speak")
    wait(browser, 30, poll=0.01).until(
        lambda d: d.execute_script("return window.voxrelay.playbackStarted")
    )
    wait(browser, 30).until(lambda d: d.execute_script("return window.voxrelay.wordNow !== null"))
    click(browser, "stop")
    wait(browser, 30).until(
        lambda d: d.execute_script("return window.voxrelay.state") != "stopping"
    )
    state = browser.execute_script(STATE)
    if state["state"] == "cancelled":  # the stream was still in flight when Stop landed
        # The server answers for the playback position the page sent: the words ended by then.
        heard, at = state["heardText"], state["stoppedAtMs"]
        ended = [w["text"] for w in state["words"] if w["end_ms"] <= at]
        assert heard is not None and text.startswith(heard)
        assert [w.strip(".,") for w in heard.split()] == ended[: len(heard.split())]
        assert status_text(browser).startswith("Stopped. You heard:" if heard else "Stopped after")

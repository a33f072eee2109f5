"""The web chat page in real headless Chromium (Debian's `chromium`, driven by Playwright) against a real server.

The screenshot is kept as a test artifact under out/test-artifacts/ (gitignored) and the test's tmp dir.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve_server import Server, write_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"
KEY = "sesame"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("web") / "tiny")
    s = Server(directory, "--api-key", KEY, threads=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server: Server):  # noqa: ANN201 - playwright's Page
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760}, locale="en-US")
        page.goto(server.url + "/")
        yield page
        browser.close()


def _set(page, selector: str, value: str) -> None:  # noqa: ANN001
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def _send(page, text: str) -> None:  # noqa: ANN001
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_key_prompt_then_streamed_multi_turn_chat(page, server: Server, tmp_path: Path) -> None:  # noqa: ANN001
    page.wait_for_selector("#settings:not([hidden])")  # /v1/models said 401, so the settings opened for the key
    _set(page, "#api-key", KEY)
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    _set(page, "#system", "You are terse.")
    _set(page, "#temperature", "0")
    _set(page, "#max-tokens", "300")
    page.click("#toggle-settings")
    # Count DOM updates of the reply: a streamed reply is painted many times, a buffered one once. The page paints
    # at most once per animation frame, so the reply is long (300 tokens, ~1300 before this model's EOS): 40 tokens
    # could all arrive within one frame on a fast machine.
    page.evaluate(
        "window.paints = 0; new MutationObserver(() => window.paints++)"
        ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})"
    )
    _send(page, "你好 hello")
    page.wait_for_selector(".msg.assistant .meta:has-text('tokens')")
    assert page.evaluate("window.paints") > 4
    assert page.inner_text(".msg.user .bubble") == "你好 hello"
    assert page.inner_text(".msg.assistant .bubble").strip()
    assert page.inner_text(".msg.assistant .meta").startswith("300 tokens")

    with page.expect_request("**/v1/chat/completions") as sent:
        _send(page, "and again")
    page.locator(".msg.assistant").nth(1).locator(".meta:has-text('tokens')").wait_for()
    body = json.loads(sent.value.post_data)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "You are terse." and body["temperature"] == 0

    page.click("#lang")
    assert page.inner_text("#send") == "发送" and page.inner_text("#new-chat") == "新对话"
    shot = tmp_path / "serve_web.png"
    page.screenshot(path=str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    page.click("#lang")


def test_stop_button_cancels_the_stream(page, server: Server) -> None:  # noqa: ANN001
    auth = {"Authorization": f"Bearer {KEY}"}
    cancelled = server.metric("lmforge_cancelled_sequences_total", auth)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.click("#toggle-settings")
    _set(page, "#max-tokens", "4000")  # this greedy reply runs ~1300 tokens before the tiny model says EOS
    page.click("#toggle-settings")
    _send(page, "你好 hello")
    page.wait_for_selector(".msg.assistant.streaming")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').textContent.length > 0")
    assert page.inner_text("#send") == "Stop"
    page.click("#send")
    page.wait_for_selector(".msg.assistant .meta:has-text('stopped')")
    deadline = time.monotonic() + 5
    while server.metric("lmforge_batch_occupancy", auth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("lmforge_batch_occupancy", auth) == 0
    assert server.metric("lmforge_cancelled_sequences_total", auth) == cancelled + 1
    assert page.inner_text("#send") == "Send"


def test_markdown_is_rendered_and_escaped(page) -> None:  # noqa: ANN001
    html = page.evaluate(
        """Markdown.render("# Title\\n**bold** and `x<y`\\n\\n- one\\n- two\\n\\n```python\\nprint('<b>')\\n```\\n"""
        """<script>alert(1)</script> [link](https://example.com) [bad](javascript:alert(1))")"""
    )
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert "print('&lt;b&gt;')" in html and "<span>python</span>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="https://example.com"' in html and "javascript:" not in html.split("[bad]")[0].split("href")[-1]
    # An unclosed fence (a reply still streaming) renders as code already.
    assert "<pre><code>half" in page.evaluate("Markdown.render('```\\nhalf')")

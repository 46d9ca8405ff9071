"""The web chat page (`GET /`) in a real headless Chromium, against the real server.

The server runs under uvicorn in a thread on a free loopback port with a tiny random model
(greedy, short replies); Selenium drives Debian's `chromium` through its `chromium-driver`
(no browser download). The browser tests skip, saying why, where either binary or the
`selenium` package is missing; `.ci/run` installs both packages.
Set SL_WEB_SCREENSHOT=path.png to keep a screenshot of the page after the first test's reply.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from test_server import Server, one_thread, tiny  # noqa: F401 - fixtures used by name

WEB = dict(default_max_tokens=12, temperature=0.0)  # greedy, short replies
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _why_no_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no chromium binary (apt-get install chromium chromium-driver)"
    if DRIVER is None:
        return "no chromedriver binary (apt-get install chromium-driver)"
    return None


needs_browser = pytest.mark.skipif(_why_no_browser() is not None, reason=_why_no_browser() or "")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with Server(*tiny[1:], tmp_path_factory.mktemp("data"), **WEB) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(tiny, tmp_path_factory):
    with Server(*tiny[1:], tmp_path_factory.mktemp("data-key"), api_key="sekret-123", **WEB) as s:
        yield s


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,760",
                "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# ---- helpers -----------------------------------------------------------------------------------
def wait(driver, predicate, timeout=60, what="condition"):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page re-renders lists as it updates: an element read mid-render is retried, not a failure
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: predicate(d), message=f"timed out waiting for {what}")


def text(driver, element_id) -> str:
    return driver.find_element("id", element_id).text


def bubbles(driver) -> list[tuple[str, str]]:
    """(role, text) of the shown messages, read in one script call (the page re-renders them)."""
    js = "return Array.from(document.querySelectorAll('#messages .msg'), e => [e.dataset.role, e.textContent])"
    return [tuple(b) for b in driver.execute_script(js)]


def send(driver, message):
    box = driver.find_element("id", "prompt")
    box.clear()
    box.send_keys(message)
    driver.find_element("id", "send").click()


def seen(driver) -> int:
    return int(text(driver, "stat-seen").replace(",", "") or 0)


def send_and_wait(driver, message) -> str:
    """Send a message; wait until the streamed reply has ended; return the reply text."""
    before = len(bubbles(driver))
    send(driver, message)
    # the reply's bubble appears while streaming; then the page returns to idle
    wait(driver, lambda d: len(bubbles(d)) >= before + 2, what="the reply bubble")
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "idle", what="the reply to end")
    error = driver.find_element("id", "error")
    assert not error.is_displayed(), error.text
    role, reply = bubbles(driver)[-1]
    assert role == "assistant"
    return reply


# ---- without a browser --------------------------------------------------------------------------
def test_page_and_files_are_served_and_the_api_keeps_its_key(keyed_server):
    url = keyed_server.url
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"model": "tiny"' in page.text and '"sinks": 4' in page.text and '"window": 48' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{url}/web/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.text) > 500
    assert "cdn" not in page.text.lower() and "http" not in page.text.split("<body>")[1]  # nothing from elsewhere
    for path in ("/v1/models", "/v1/sessions", "/v1/sessions/x", "/web/nope.js", "/metrics"):
        assert httpx.get(url + path).status_code == 401, path
    ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekret-123"})
    assert ok.status_code == 200
    doc = httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer sekret-123"}).json()
    assert "/" not in doc["paths"] and not any(p.startswith("/web") for p in doc["paths"])


def test_package_ships_the_web_files():
    from importlib import resources

    files = resources.files("streaming_llm.server.web")
    for name in ("index.html", "app.js", "style.css"):
        assert files.joinpath(name).is_file(), name


# ---- in Chromium --------------------------------------------------------------------------------
@needs_browser
def test_chat_streams_shows_the_cache_and_survives_a_reload(server, browser):
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "idle", what="the page")
    assert seen(browser) == 0 and text(browser, "stat-cache") == "0/52" and "4 sinks + 48 window" in text(browser, "model-name")
    sessions = browser.find_elements("css selector", "#sessions li")
    assert len(sessions) == 1  # a new conversation, not yet on the server
    sid = sessions[0].get_attribute("data-id")
    assert sid.startswith("web-")

    reply1 = send_and_wait(browser, "Hello there, tell me a story")
    assert reply1.strip()
    # the reply arrived as SSE chunks, one per token, each appended to the bubble as it came
    chunks = browser.execute_script("return document.querySelector('#messages .msg.assistant:last-child').dataset.chunks")
    assert int(chunks) >= 2
    seen1 = seen(browser)
    assert seen1 > 0
    # the server's own numbers for that session
    info = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
    assert info["tokens_seen"] == seen1 and info["turns"] == 1 and text(browser, "stat-turns") == "1"
    assert [m["role"] for m in info["messages"]] == ["user", "assistant"]
    assert info["messages"][1]["content"] == reply1
    cache, capacity = (int(x) for x in text(browser, "stat-cache").split("/"))
    assert capacity == 52 and cache == min(seen1, 52)
    assert text(browser, "stat-sinks") == "4/4" and "tok/s" in text(browser, "stat-speed")
    width = browser.execute_script("return document.getElementById('bar-window').style.width")
    assert width.endswith("%") and float(width[:-1]) > 0
    if os.environ.get("SL_WEB_SCREENSHOT"):
        browser.save_screenshot(os.environ["SL_WEB_SCREENSHOT"])

    # a second turn: the stream grows past the 52-token cache, and evicts
    reply2 = send_and_wait(browser, "And then what happened next in the story?")
    seen2 = seen(browser)
    assert seen2 > seen1
    evicted = int(text(browser, "stat-evicted").replace(",", ""))
    assert evicted == max(0, seen2 - 52)
    assert text(browser, "stat-cache") == f"{min(seen2, 52)}/52"

    # reload: the conversation comes back from GET /v1/sessions/{id}
    browser.refresh()
    wait(browser, lambda d: len(bubbles(d)) == 4, what="the conversation after a reload")
    got = bubbles(browser)
    assert got == [("user", "Hello there, tell me a story"), ("assistant", reply1),
                   ("user", "And then what happened next in the story?"), ("assistant", reply2)]
    assert seen(browser) == seen2
    assert [li.get_attribute("data-id") for li in browser.find_elements("css selector", "#sessions li")] == [sid]

    # a new conversation is a new session; the old one is still one click away
    browser.find_element("id", "new-chat").click()
    wait(browser, lambda d: len(d.find_elements("css selector", "#sessions li")) == 2, what="a second session")
    assert bubbles(browser) == [] and seen(browser) == 0
    send_and_wait(browser, "Hi")
    sid2 = browser.find_element("css selector", "#sessions li.active").get_attribute("data-id")
    assert sid2 != sid and httpx.get(f"{server.url}/v1/sessions/{sid2}").json()["turns"] == 1
    browser.find_element("css selector", f'#sessions li[data-id="{sid}"]').click()
    wait(browser, lambda d: len(bubbles(d)) == 4, what="the first conversation again")
    assert seen(browser) == seen2

    # a session the server no longer has (deleted, expired) opens empty; the page's delete button
    # deletes it on the server too
    assert httpx.delete(f"{server.url}/v1/sessions/{sid2}").status_code == 200
    browser.find_element("css selector", f'#sessions li[data-id="{sid2}"]').click()
    wait(browser, lambda d: bubbles(d) == [] and seen(d) == 0, what="the deleted session, empty")
    from selenium.webdriver.common.action_chains import ActionChains

    row = browser.find_element("css selector", f'#sessions li[data-id="{sid}"]')
    ActionChains(browser).move_to_element(row).click(row.find_element("css selector", ".del")).perform()  # shown on hover
    wait(browser, lambda d: sid not in [li.get_attribute("data-id") for li in d.find_elements("css selector", "#sessions li")],
         what="the deleted conversation to leave the list")
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").status_code == 404
    # no script errors (the 404s of sessions not on the server yet are the browser's network log)
    errors = [e["message"] for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert errors == []


@needs_browser
def test_with_an_api_key_the_page_asks_for_it(keyed_server, browser):
    browser.get(keyed_server.url + "/")
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "idle", what="the page")
    send(browser, "Hello?")
    wait(browser, lambda d: d.find_element("id", "error").is_displayed(), what="the 401")
    assert "401" in text(browser, "error") and "API key" in text(browser, "error")
    assert bubbles(browser) == []  # the failed message is taken back

    key = browser.find_element("id", "api-key")
    key.send_keys("sekret-123")
    browser.find_element("id", "prompt").click()  # the change event stores the key
    reply = send_and_wait(browser, "Hello?")
    assert reply.strip() and seen(browser) > 0
    assert browser.execute_script("return localStorage.getItem('sl.apiKey')") == "sekret-123"

    browser.refresh()
    wait(browser, lambda d: len(bubbles(d)) == 2, what="the conversation after a reload")
    assert bubbles(browser) == [("user", "Hello?"), ("assistant", reply)]
    # a wrong key: the reload shows the server's refusal instead of the conversation
    browser.execute_script("localStorage.setItem('sl.apiKey', 'wrong')")
    browser.refresh()
    wait(browser, lambda d: d.find_element("id", "error").is_displayed(), what="the 401 with a wrong key")
    assert "401" in text(browser, "error") and bubbles(browser) == []

"""The widget in a real browser (headless Chromium through Playwright): one script tag on a page of another site
(served here on `localhost`, the backend on `127.0.0.1`: another site, so nothing ambient travels)."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

import pytest
from playwright.sync_api import expect, sync_playwright

from scripts.services import free_port
from tests.conftest import Client, one_page_server, second_web, site_token

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"]


@contextmanager
def host_page(widget_url: str, port: int, token: str | None = None):
    """A shop's page on ``localhost:port`` that adds the widget of ``widget_url`` with one script tag."""
    data = f' data-token="{token}"' if token else ""
    body = (f'<!doctype html><html><head><title>Shop</title></head><body><h1>A shop</h1>'
            f'<script src="{widget_url}/widget.js" async{data}></script></body></html>').encode()
    with one_page_server(body, "text/html; charset=utf-8", port):
        yield f"http://localhost:{port}"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def shop_with_widget(stack, allowed: bool = True, token: str | None = None):
    """A widget backend (a second web server: guests on, long replies allowed) and a shop's page that embeds it:
    the backend's URL and the page's."""
    port = free_port()
    origins = [f"http://localhost:{port}"] if allowed else []
    with second_web(stack, allowed_origins=origins, guests=True, default_max_new_tokens=300,
                    max_new_tokens_cap=300) as (url, _), host_page(url, port, token) as shop:
        yield url, shop


def messages_in(stack, conversation_id: str) -> int:
    with stack.replica() as conn:  # what the history the widget reads will show
        return conn.execute("SELECT count(*) FROM messages WHERE conversation_id = %s",
                            (conversation_id,)).fetchone()[0]


def test_a_guest_chats_stops_a_reply_and_finds_the_conversation_after_a_reload(stack, browser):
    with shop_with_widget(stack) as (url, shop):
        page = browser.new_page()
        sockets = []
        page.on("websocket", lambda ws: sockets.append(ws))
        page.goto(shop)
        page.locator("button.launcher").click()
        expect(page.locator("section.panel")).to_be_visible()
        # A streamed answer.
        page.locator("textarea").fill("Say hello in five words.")
        page.locator("textarea").press("Enter")
        first = page.locator(".msg.assistant").nth(0)
        expect(first).to_have_attribute("data-finish", re.compile("stop|length"), timeout=120_000)
        expect(first).to_have_text(re.compile(r"\S"))
        # Stop, while it streams.
        page.locator("textarea").fill("Write a very long story about a lighthouse keeper and the sea.")
        page.locator("textarea").press("Enter")
        second = page.locator(".msg.assistant").nth(1)
        expect(second).to_have_text(re.compile(r"\S"), timeout=120_000)
        page.locator("button.stop").click()
        expect(second).to_have_attribute("data-finish", "cancelled", timeout=60_000)
        assert [ws.url for ws in sockets] == [url.replace("http", "ws", 1) + "/ws"]  # no token in the URL
        # A reload: the panel opens on the same conversation, from the history.
        conversation = page.evaluate(f"localStorage.getItem('chatqueue:{url}:conversation')")
        deadline = time.monotonic() + 30
        while messages_in(stack, conversation) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        page.reload()
        expect(page.locator("section.panel")).to_be_visible()
        expect(page.locator(".msg")).to_have_count(4, timeout=30_000)
        expect(page.locator(".msg.user").nth(1)).to_have_text(re.compile("lighthouse keeper"))
        page.close()


def test_a_reply_is_rendered_from_markdown_and_html_in_it_runs_nothing(stack, browser):
    token = site_token("widget-reader")
    with shop_with_widget(stack, token=token) as (url, shop):
        # A conversation of the site's user whose stored reply carries Markdown and a script in an attribute.
        client = Client(url, token)
        try:
            accepted, _, _ = client.chat("Say yes.", max_new_tokens=1)
        finally:
            client.close()
        reply = ("Here is **bold** text:\n\n- one\n- two\n\n`code` and "
                 "<img src=x onerror=\"window.__xss = 1\"><script>window.__xss = 2</script>")
        with stack.primary() as conn:
            conn.execute("UPDATE messages SET content = %s WHERE request_id = %s AND role = 'assistant'",
                         (reply, accepted["request_id"]))
        deadline = time.monotonic() + 30
        while True:
            with stack.replica() as conn:
                if conn.execute("SELECT count(*) FROM messages WHERE content = %s", (reply,)).fetchone()[0]:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        page = browser.new_page()
        page.add_init_script(f"localStorage.setItem('chatqueue:{url}:conversation', "
                             f"'{accepted['conversation_id']}')")
        page.goto(shop)
        answer = page.locator(".msg.assistant").nth(0)
        expect(answer.locator("strong")).to_have_text("bold", timeout=30_000)
        expect(answer.locator("li")).to_have_count(2)
        expect(answer.locator("code")).to_have_text("code")
        assert answer.locator("img").evaluate_all("els => els.map(e => e.getAttribute('onerror'))") in ([], [None])
        assert answer.locator("script").count() == 0
        time.sleep(1)  # time for an onerror to have run, were it there
        assert page.evaluate("window.__xss") is None
        page.close()


def test_on_a_site_not_allowed_the_widget_says_so_once_and_opens_no_socket(stack, browser):
    with shop_with_widget(stack, allowed=False) as (url, shop):
        page = browser.new_page()
        sockets = []
        page.on("websocket", lambda ws: sockets.append(ws))
        page.goto(shop)
        page.locator("button.launcher").click()
        expect(page.locator(".notice")).to_have_text(re.compile("not allowed"), timeout=30_000)
        time.sleep(3)  # no reconnecting meanwhile
        assert sockets == [] and page.locator(".notice").count() == 1
        page.close()


def test_the_full_chat_page_signs_in_a_guest_and_renders_the_reply(stack, browser):
    with second_web(stack, guests=True) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.locator("#input").fill("Say hello.")
        page.locator("#input").press("Enter")
        expect(page.locator("#status")).to_have_text(re.compile("^done"), timeout=120_000)
        expect(page.locator(".msg.assistant")).to_have_text(re.compile(r"\S"))
        page.close()
    with second_web(stack, guests=False) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        expect(page.locator(".error")).to_have_text(re.compile("signs its users in"), timeout=30_000)
        page.close()

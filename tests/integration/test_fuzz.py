"""Fuzzing the running server (not only the parser) with hypothesis: random JSON, wrong types, huge numbers,
deep nesting, NUL and lone surrogates, binary frames, odd paths. Never `internal`, the socket stays open, and
nothing is written."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any character, NUL and lone surrogates among them.
CHARS = st.one_of(st.characters(), st.just("\x00"),
                  st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]))
TEXT = st.text(CHARS, max_size=40)
NUMBERS = st.one_of(st.integers(), st.integers(min_value=10**30, max_value=10**300), st.floats(allow_nan=True))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
                    max_leaves=12)
FIELDS = ["content", "conversation_id", "client_id", "max_new_tokens", "temperature", "request_id", "after_seq"]


@st.composite
def frames(draw) -> str | bytes:
    kind = draw(st.sampled_from(["object", "json", "deep", "huge", "binary", "text"]))
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "text":
        return draw(TEXT)
    if kind == "deep":
        depth = draw(st.integers(100, 1500))  # within the frame size limit: a larger frame closes the socket (1009)
        return draw(st.sampled_from(["[", '{"a":'])) * depth
    if kind == "huge":  # a number of more digits than Python's int() takes from a string
        field = draw(st.sampled_from(["max_new_tokens", "temperature", "after_seq"]))
        return f'{{"type": "chat", "content": "x", "{field}": {draw(st.sampled_from(["", "-"]))}{"9" * 4400}}}'
    if kind == "json":
        return json.dumps(draw(JSON))
    frame = {"type": draw(st.one_of(st.sampled_from(["chat", "cancel", "resume", "ping", "shout"]), JSON))}
    frame.update(draw(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5)))
    if frame["type"] == "chat":  # a conversation nobody has: even a well-formed chat is refused, writing nothing
        frame["conversation_id"] = draw(TEXT)
    return json.dumps(frame)


@pytest.fixture
def counts(stack):
    return lambda: (stack.count("messages"), stack.count("conversations"), stack.count("chat_requests"))


@FUZZ
@given(raw=frames())
def test_any_frame_gets_a_contract_answer_and_writes_nothing(stack, client, counts, raw):
    # A frame over the size limit closes the socket, by contract (tests/integration/test_bad_input.py).
    assume(len(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")) <= stack.settings.max_frame_bytes)
    before = counts()
    if isinstance(raw, bytes):
        client.ws.send_binary(raw)
    else:
        client.send(raw)
    reply = client.recv()
    if reply != {"type": "pong"}:
        assert reply["type"] == "error" and reply["code"] in ("bad_request", "not_found", "too_large"), reply
    assert client.ask({"type": "ping"}) == {"type": "pong"}  # the socket stays open
    assert counts() == before


@FUZZ
@given(segment=TEXT, method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]), body=JSON)
def test_any_request_to_the_rest_api_gets_a_contract_answer_and_writes_nothing(stack, client, counts, segment,
                                                                                method, body):
    before = counts()
    path = f"/api/conversations/{quote(segment.encode('utf-8', 'surrogatepass'), safe='')}"
    for url in (path, path + "/messages", "/api/conversations"):
        res = client.http.request(method, client.base_url + url, data=json.dumps(body), timeout=10,
                                  headers={"Content-Type": "application/json"})
        assert res.status_code < 500, (url, res.status_code, res.text)
        if res.status_code >= 400:
            assert res.json()["error"]["code"] in ("bad_request", "not_found"), res.text
    assert counts() == before

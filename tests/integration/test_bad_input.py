"""Bad input: an error frame with the contract's code, the socket stays usable, nothing is written."""

from __future__ import annotations

import json

import pytest
import websocket

pytestmark = pytest.mark.integration

BAD_FRAMES = [
    ("not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('"chat"', "bad_request"),
    ("{}", "bad_request"),
    ('{"type": "shout"}', "bad_request"),
    ('{"type": 7}', "bad_request"),
    ('{"type": "chat"}', "bad_request"),
    ('{"type": "chat", "content": 5}', "bad_request"),
    ('{"type": "chat", "content": "   "}', "bad_request"),
    ('{"type": "chat", "content": "hi", "max_new_tokens": 0}', "bad_request"),
    ('{"type": "chat", "content": "hi", "max_new_tokens": "ten"}', "bad_request"),
    ('{"type": "chat", "content": "hi", "max_new_tokens": 1.5}', "bad_request"),
    ('{"type": "chat", "content": "hi", "temperature": -0.1}', "bad_request"),
    ('{"type": "chat", "content": "hi", "temperature": 99}', "bad_request"),
    ('{"type": "chat", "content": "hi", "conversation_id": 12}', "bad_request"),
    ('{"type": "chat", "content": "hi", "conversation_id": "nope"}', "not_found"),
    ('{"type": "chat", "content": "hi", "client_id": ""}', "bad_request"),
    ('{"type": "cancel"}', "bad_request"),
    ('{"type": "cancel", "request_id": "nope"}', "not_found"),
    ('{"type": "resume", "request_id": "nope", "after_seq": -1}', "not_found"),
    ('{"type": "resume", "request_id": "x", "after_seq": -2}', "bad_request"),
    ('{"type": "resume", "after_seq": 3}', "bad_request"),
    # JSON escapes that PostgreSQL's text and UTF-8 cannot take: a NUL, half of a surrogate pair.
    ('{"type": "chat", "content": "a\\u0000b"}', "bad_request"),
    ('{"type": "chat", "content": "a\\ud800b"}', "bad_request"),
    ('{"type": "chat", "content": "\\udfff"}', "bad_request"),
    ('{"type": "chat", "content": "hi", "conversation_id": "\\u0000"}', "bad_request"),
    ('{"type": "chat", "content": "hi", "client_id": "k\\ud83d"}', "bad_request"),
    ('{"type": "cancel", "request_id": "\\u0000"}', "bad_request"),
    ('{"type": "resume", "request_id": "\\udc00", "after_seq": -1}', "bad_request"),
]


@pytest.mark.parametrize("raw,code", BAD_FRAMES)
def test_bad_frame_gets_its_code_and_writes_nothing(stack, client, raw, code):
    before = (stack.count("messages"), stack.count("conversations"), stack.count("chat_requests"))
    reply = client.ask(raw)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"]
    assert client.ask({"type": "ping"}) == {"type": "pong"}  # the socket stays usable
    assert (stack.count("messages"), stack.count("conversations"), stack.count("chat_requests")) == before


def test_content_over_the_limit_is_too_large(stack, client):
    before = stack.count("messages")
    reply = client.ask({"type": "chat", "content": "a" * (stack.settings.max_content_chars + 1)})
    assert reply["code"] == "too_large"
    assert client.ask({"type": "ping"}) == {"type": "pong"}
    assert stack.count("messages") == before


def test_binary_frame_is_bad_request(client):
    client.ws.send_binary(b"\x00\x01")
    assert client.recv()["code"] == "bad_request"
    assert client.ask({"type": "ping"}) == {"type": "pong"}


def test_frame_over_the_size_limit_closes_with_1009(stack, client):
    before = stack.count("messages")
    client.send(json.dumps({"type": "chat", "content": "x" * (stack.settings.max_frame_bytes + 10)}))
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            opcode, frame = client.ws.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                assert int.from_bytes(frame.data[:2], "big") == 1009
                raise websocket.WebSocketConnectionClosedException("closed")
    assert stack.count("messages") == before


def test_http_errors_are_json_with_codes(stack, client):
    res = client.http.get(client.base_url + "/api/nothing-here")
    assert res.status_code == 404 and res.json()["error"]["code"] == "not_found"
    res = client.http.post(client.base_url + "/api/conversations")
    assert res.status_code == 405 and res.json()["error"]["code"] == "bad_request"


# A NUL reaches the view as one; bytes of a lone surrogate arrive as replacement characters, an id nobody has.
@pytest.mark.parametrize("conversation_id,code", [("a%00b", "bad_request"), ("%ED%A0%80", "not_found")])
def test_an_id_in_the_path_with_a_nul_or_a_lone_surrogate_writes_nothing(stack, client, conversation_id, code):
    before = stack.count("conversations")
    for method, path in (("get", f"/api/conversations/{conversation_id}/messages"),
                         ("delete", f"/api/conversations/{conversation_id}")):
        res = client.http.request(method, client.base_url + path, timeout=10)
        assert res.json()["error"]["code"] == code, res.text
        assert res.status_code == {"bad_request": 400, "not_found": 404}[code]
    assert stack.count("conversations") == before


def test_foreign_origin_is_refused(stack):
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://127.0.0.1:{stack.settings.web_port}/ws",
                                    origin="http://evil.example", timeout=10)
    assert err.value.status_code == 403


def test_a_delete_from_a_foreign_page_is_refused_and_deletes_nothing(stack, client):
    accepted, _, _ = client.chat("Keep this.", max_new_tokens=2)
    url = f"{client.base_url}/api/conversations/{accepted['conversation_id']}"
    res = client.http.delete(url, headers={"Origin": "http://evil.example"}, timeout=10)
    assert res.status_code == 403 and res.json()["error"]["code"] == "unauthorized"
    stack.pg.wait_replayed()
    assert client.messages(accepted["conversation_id"]).status_code == 200
    assert client.http.delete(url, headers={"Origin": client.base_url}, timeout=10).status_code == 204

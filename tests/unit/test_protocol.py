"""Parsing client frames: every input ends in a typed frame or a ProtocolError with a code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.protocol import (
    Cancel,
    Chat,
    ErrorCode,
    Ping,
    ProtocolError,
    Resume,
    done_frame,
    error_frame,
    parse_client_frame,
)

LIMIT = 100


def parse(frame) -> object:
    return parse_client_frame(frame if isinstance(frame, (str, bytes)) else json.dumps(frame), LIMIT)


def test_valid_frames_parse_to_their_types():
    chat = parse({"type": "chat", "content": "hi", "conversation_id": None, "client_id": "k",
                  "max_new_tokens": 5, "temperature": 0.7, "extra": "ignored"})
    assert isinstance(chat, Chat) and chat.content == "hi" and chat.max_new_tokens == 5 and chat.temperature == 0.7
    assert isinstance(parse({"type": "cancel", "request_id": "r"}), Cancel)
    assert parse({"type": "resume", "request_id": "r", "after_seq": -1}) == Resume(type="resume", request_id="r",
                                                                                   after_seq=-1)
    assert isinstance(parse({"type": "ping"}), Ping)
    assert parse({"type": "chat", "content": "x", "temperature": 0}).temperature == 0


@pytest.mark.parametrize("frame,code", [
    ("{", ErrorCode.BAD_REQUEST),
    (b"{}", ErrorCode.BAD_REQUEST),
    ([], ErrorCode.BAD_REQUEST),
    ({"content": "no type"}, ErrorCode.BAD_REQUEST),
    ({"type": "chat", "content": True}, ErrorCode.BAD_REQUEST),
    ({"type": "chat", "content": "x", "max_new_tokens": True}, ErrorCode.BAD_REQUEST),
    ({"type": "chat", "content": "x", "temperature": "hot"}, ErrorCode.BAD_REQUEST),
    ({"type": "chat", "content": "\n\t "}, ErrorCode.BAD_REQUEST),
    ({"type": "chat", "content": "x" * (LIMIT + 1)}, ErrorCode.TOO_LARGE),
    ({"type": "resume", "request_id": "r", "after_seq": "1"}, ErrorCode.BAD_REQUEST),
])
def test_bad_frames_get_codes(frame, code):
    with pytest.raises(ProtocolError) as err:
        parse(frame)
    assert err.value.code is code
    assert err.value.message


def test_content_at_the_limit_is_accepted():
    assert parse({"type": "chat", "content": "x" * LIMIT}).content == "x" * LIMIT


@given(st.one_of(st.text(), st.binary()))
def test_any_text_or_bytes_never_crash(raw):
    try:
        parse_client_frame(raw, LIMIT)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=10)


@given(st.sampled_from(["chat", "cancel", "resume", "ping", "other"]),
       st.dictionaries(st.sampled_from(["content", "request_id", "after_seq", "max_new_tokens", "temperature",
                                        "conversation_id", "client_id"]), json_values))
def test_any_json_object_never_crashes(kind, fields):
    try:
        frame = parse({"type": kind, **fields})
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
    else:
        assert frame.type == kind


def test_server_frames_follow_the_contract():
    assert error_frame(ProtocolError(ErrorCode.BUSY, "full", retry_after=2.0)) == {
        "type": "error", "code": "busy", "message": "full", "retry_after": 2.0}
    assert done_frame("r", "m", "stop", 3, 4) == {"type": "done", "request_id": "r", "message_id": "m",
                                                  "finish_reason": "stop",
                                                  "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    assert done_frame("r", "m", "stop", 3, 4, 12.345)["timing"] == {"engine_first_token_ms": 12.3}  # optional extra


# Any character, lone surrogates and NUL among them (json.dumps writes them as escapes).
ANY_CHARACTER = st.one_of(st.characters(), st.just("\x00"),
                          st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]))


@given(st.text(alphabet=ANY_CHARACTER, min_size=1), st.sampled_from(["content", "conversation_id", "client_id"]))
def test_an_accepted_chat_holds_only_text_that_can_be_stored(text, field):
    frame = {"type": "chat", "content": "hi", field: text}
    try:
        chat = parse(frame)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
        return
    for value in (chat.content, chat.conversation_id, chat.client_id):
        if value is not None:
            assert "\x00" not in value
            value.encode("utf-8")  # no lone surrogate


@pytest.mark.parametrize("raw", ["[" * 5000, '{"a":' * 3000, '{"type": "chat", "content": "x", "max_new_tokens": '
                                 + "9" * 5000 + "}"])
def test_deep_nesting_and_endless_numbers_are_bad_requests(raw):
    with pytest.raises(ProtocolError) as refused:
        parse(raw)
    assert refused.value.code == ErrorCode.BAD_REQUEST

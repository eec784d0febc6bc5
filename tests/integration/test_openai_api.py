"""The OpenAI-compatible API, driven by the official `openai` client against the running stack: the same queue,
workers, streams and storage as the WebSocket; OpenAI's error shapes; nothing stored or queued on a refusal."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest
import redis
import requests

from app.web.identity import owner_of
from config.settings import ROOT
from scripts import loadgen
from scripts.services import free_port, settings_env
from tests.conftest import SITE_ISSUER, second_web, site_token

pytestmark = pytest.mark.integration

API_USER = "api-user"


def make_key(stack, sub: str = API_USER, name: str = "tests") -> dict:
    """A key made by the command an operator uses."""
    out = subprocess.run([sys.executable, "-m", "app.web.keys", "create", "--issuer", SITE_ISSUER, "--sub", sub,
                          "--name", name], cwd=ROOT, env=settings_env(stack.settings), check=True,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def key(stack) -> str:
    return make_key(stack)["key"]


def client(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def state(stack) -> tuple:
    """Every table's row count and the queue's length: what a refused request must leave as it was."""
    r = redis.Redis(port=stack.settings.redis_port)
    return (stack.count("messages"), stack.count("conversations"), stack.count("chat_requests"),
            r.llen(stack.settings.queue))


def stored(stack, completion_id: str) -> tuple:
    request_id = completion_id.removeprefix("chatcmpl-")
    deadline = time.monotonic() + 60
    while True:
        with stack.primary() as conn:
            row = conn.execute("SELECT m.content, m.finish_reason, m.prompt_tokens, m.completion_tokens, c.owner "
                               "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                               "WHERE m.request_id = %s AND m.role = 'assistant'", (request_id,)).fetchone()
        if row is not None:
            return row
        assert time.monotonic() < deadline, "reply not stored"
        time.sleep(0.1)


def test_models_lists_the_model_this_web_tier_serves_and_whether_a_worker_is_live(stack, key):
    models = client(stack.base_url, key).models.list().data
    assert [(m.id, m.model_extra["ready"]) for m in models] == [(stack.settings.model_id, True)]


def test_streamed_and_whole_greedy_replies_are_the_same_text_stored_once_for_the_keys_owner(stack, key):
    api = client(stack.base_url, key)
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = api.chat.completions.create(model=stack.settings.model_id, messages=messages, temperature=0,
                                        max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(api.chat.completions.create(model=stack.settings.model_id, messages=messages, temperature=0,
                                              max_tokens=12, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage  # the last chunk: no choices, the usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    for completion, u in ((whole.id, whole.usage), (chunks[0].id, usage)):
        content, finish, prompt_tokens, completion_tokens, owner = stored(stack, completion)
        assert content == text and owner == owner_of(SITE_ISSUER, API_USER)
        assert (u.prompt_tokens, u.completion_tokens) == (prompt_tokens, completion_tokens)
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The whole exchange is a conversation of the key's owner, who sees it with a JWT too (as through the widget).
    with stack.primary() as conn:
        conversation = conn.execute("SELECT conversation_id FROM chat_requests WHERE id = %s",
                                    (whole.id.removeprefix("chatcmpl-"),)).fetchone()[0]
        roles = [r[0] for r in conn.execute("SELECT role FROM messages WHERE conversation_id = %s "
                                            "ORDER BY created_at", (conversation,))]
    assert roles == ["system", "user", "assistant"]
    stack.pg.wait_replayed()  # history is read from the replica
    seen = requests.get(f"{stack.base_url}/api/conversations/{conversation}/messages", timeout=10,
                        headers={"Authorization": f"Bearer {site_token(API_USER)}"})
    assert [m["role"] for m in seen.json()["messages"]] == roles


def test_a_jwt_is_taken_as_well_as_a_key(stack):
    api = client(stack.base_url, site_token("jwt-api-user"))
    reply = api.chat.completions.create(model=stack.settings.model_id, max_tokens=2,
                                        messages=[{"role": "user", "content": "Hi"}])
    assert stored(stack, reply.id)[4] == owner_of(SITE_ISSUER, "jwt-api-user")


def _bad_requests(model: str, cap: int, limit: int) -> dict:
    user = [{"role": "user", "content": "Hi"}]
    return {
        "no messages": ({"model": model, "messages": []}, openai.BadRequestError, "messages"),
        "an unknown role": ({"model": model, "messages": [{"role": "wizard", "content": "x"}]},
                            openai.BadRequestError, "messages.0.role"),
        "a model not configured": ({"model": "gpt-nothing", "messages": user}, openai.NotFoundError, "model"),
        "max_tokens over the cap": ({"model": model, "messages": user, "max_tokens": cap + 1},
                                    openai.BadRequestError, "max_tokens"),
        "temperature out of range": ({"model": model, "messages": user, "temperature": 50},
                                     openai.BadRequestError, "temperature"),
        "n > 1": ({"model": model, "messages": user, "n": 2}, openai.BadRequestError, "n"),
        "content over the limit": ({"model": model, "messages": [{"role": "user", "content": "x" * (limit + 1)}]},
                                   openai.APIStatusError, "messages.0.content"),
        "the last message not the user's": ({"model": model, "messages": [{"role": "assistant", "content": "x"}]},
                                            openai.BadRequestError, "messages"),
        "a NUL in content": ({"model": model, "messages": [{"role": "user", "content": "a\x00b"}]},
                             openai.BadRequestError, "messages.0.content"),
    }


@pytest.mark.parametrize("case", list(_bad_requests("m", 1, 1)))
def test_bad_input_gets_its_openai_error_and_changes_nothing(stack, key, case):
    body, error, param = _bad_requests(stack.settings.model_id, stack.settings.max_new_tokens_cap,
                                       stack.settings.max_content_chars)[case]
    before = state(stack)
    with pytest.raises(error) as raised:
        client(stack.base_url, key).chat.completions.create(**body)
    status = {"a model not configured": 404, "content over the limit": 413}.get(case, 400)
    assert raised.value.status_code == status
    assert raised.value.body["param"] == param and raised.value.body["message"]
    assert state(stack) == before


def test_a_body_that_is_not_json_and_bad_credentials_get_their_errors(stack, key):
    before = state(stack)
    url = f"{stack.base_url}/v1/chat/completions"
    res = requests.post(url, data=b"{not json", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert res.status_code == 400 and set(res.json()["error"]) == {"message", "type", "param", "code"}
    body = {"model": stack.settings.model_id, "messages": [{"role": "user", "content": "Hi"}]}
    revoked = make_key(stack, name="revoked")
    subprocess.run([sys.executable, "-m", "app.web.keys", "revoke", revoked["id"]], cwd=ROOT, check=True,
                   env=settings_env(stack.settings), capture_output=True, timeout=60)
    for bad in ("cqk_not-a-key", revoked["key"], site_token("u", ttl_s=-120), "garbage"):
        with pytest.raises(openai.AuthenticationError):
            client(stack.base_url, bad).chat.completions.create(**body)
    missing = requests.post(url, json=body, timeout=10)  # no Authorization at all
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert state(stack) == before


def test_no_worker_for_the_model_or_no_broker_is_503_and_nothing_is_stored(stack, key):
    body = {"messages": [{"role": "user", "content": "Anyone there?"}]}
    before = state(stack)
    with second_web(stack, model_queue="gen.unserved") as (base_url, _):
        api = client(base_url, key)
        assert [(m.id, m.model_extra["ready"]) for m in api.models.list().data] == [("unserved", False)]
        with pytest.raises(openai.InternalServerError) as raised:
            api.chat.completions.create(model="unserved", **body)
        assert raised.value.status_code == 503
    with second_web(stack, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                    redis_url=stack.settings.resolved_redis_url) as (base_url, _):
        with pytest.raises(openai.InternalServerError) as raised:
            client(base_url, key).chat.completions.create(model=stack.settings.model_id, **body)
        assert raised.value.status_code == 503
    assert state(stack) == before


def test_a_stream_closed_early_ends_the_request_cancelled(stack, key):
    with second_web(stack, max_new_tokens_cap=400) as (base_url, _):
        stream = client(base_url, key).chat.completions.create(
            model=stack.settings.model_id, max_tokens=400, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Write a very long story about a lighthouse keeper."}])
        chunks = [next(stream), next(stream), next(stream)]
        stream.close()
    content, finish, _, completion_tokens, _ = stored(stack, chunks[0].id)
    assert finish == "cancelled" and completion_tokens < 400


def test_the_benchmarks_sse_client_reads_streams_with_their_timing(stack):
    run = loadgen.closed_loop(stack.base_url, 2, 4, 6, api="v1")
    assert [s.error for s in run.samples] == [None] * 4
    assert all(s.token_times and s.completion_tokens and s.engine_first_token_ms is not None for s in run.samples)

"""Who may call: users of the embedding site by the JWT it signs (HS256 or a key in its JWKS), guests by the token
the backend signs where guests are allowed; every other token is `unauthorized` and writes nothing."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import jwt
import pytest
import requests
import websocket
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import SITE_ISSUER, SITE_SECRET, Client, one_page_server, second_web, site_token

pytestmark = pytest.mark.integration


def counts(stack) -> tuple[int, int, int]:
    return stack.count("messages"), stack.count("conversations"), stack.count("chat_requests")


def ws_url(base_url: str, token: str | None = None) -> str:
    return base_url.replace("http", "ws", 1) + "/ws" + (f"?token={token}" if token else "")


def recv(ws) -> dict:
    return json.loads(ws.recv())


def test_a_site_user_chats_and_reads_history_as_issuer_plus_sub(stack):
    token = site_token("user-1")
    client = Client(stack.base_url, token)
    try:
        accepted, tokens, done = client.chat("Say hello.", max_new_tokens=3)
        assert done["finish_reason"] in ("stop", "length")
        with stack.primary() as conn:
            owner = conn.execute("SELECT owner FROM conversations WHERE id = %s",
                                 (accepted["conversation_id"],)).fetchone()[0]
        assert owner == f"{SITE_ISSUER} user-1"
        # A new token for the same user (any later one) sees the same conversations (read from the replica).
        later = {"Authorization": f"Bearer {site_token('user-1', ttl_s=900)}"}
        deadline = time.monotonic() + 30
        while accepted["conversation_id"] not in [c["id"] for c in requests.get(
                stack.base_url + "/api/conversations", headers=later, timeout=10).json()["conversations"]]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # Another user of the site, and a guest, see none of it: not_found, as for a conversation that is not.
        for other in (Client(stack.base_url, site_token("user-2")), Client(stack.base_url)):
            try:
                assert other.messages(accepted["conversation_id"]).status_code == 404
                refused = other.ask({"type": "resume", "request_id": accepted["request_id"]})
                assert refused["code"] == "not_found"
                cont = other.ask({"type": "chat", "content": "Mine now?",
                                  "conversation_id": accepted["conversation_id"]})
                assert cont["code"] == "not_found"
            finally:
                other.close()
    finally:
        client.close()


BAD_TOKENS = {
    "expired": lambda: site_token("user-1", ttl_s=-120),
    "wrongly signed": lambda: site_token("user-1", secret="another-secret-of-at-least-32-bytes!"),
    "issuer not accepted": lambda: site_token("user-1", issuer="https://other.test"),
    "malformed": lambda: "not.a.jwt",
    "no sub": lambda: jwt.encode({"iss": SITE_ISSUER, "exp": int(time.time()) + 60}, SITE_SECRET, algorithm="HS256"),
    "alg none": lambda: jwt.encode({"iss": SITE_ISSUER, "sub": "u", "exp": int(time.time()) + 60}, None,
                                   algorithm="none"),
}


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_a_bad_token_is_unauthorized_on_the_socket_and_over_http_and_writes_nothing(stack, kind):
    token = BAD_TOKENS[kind]()
    before = counts(stack)
    res = requests.get(stack.base_url + "/api/conversations", headers={"Authorization": f"Bearer {token}"},
                       timeout=10)
    assert res.status_code == 401 and res.json()["error"]["code"] == "unauthorized", res.text
    ws = websocket.create_connection(ws_url(stack.base_url, token), timeout=30)
    try:
        assert recv(ws)["code"] == "unauthorized"  # said at once, on a socket left open
        ws.send(json.dumps({"type": "chat", "content": "Let me in."}))
        assert recv(ws)["code"] == "unauthorized"
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws) == {"type": "pong"}
    finally:
        ws.close()
    assert counts(stack) == before


def test_a_socket_without_a_token_signs_in_with_an_auth_frame(stack):
    before = counts(stack)
    ws = websocket.create_connection(ws_url(stack.base_url), timeout=60)
    try:
        ws.send(json.dumps({"type": "chat", "content": "Hello?"}))
        assert recv(ws)["code"] == "unauthorized"
        assert counts(stack) == before
        ws.send(json.dumps({"type": "auth", "token": site_token("user-1", ttl_s=-120)}))
        assert recv(ws)["code"] == "unauthorized"
        ws.send(json.dumps({"type": "auth", "token": site_token("user-3")}))
        assert recv(ws) == {"type": "authenticated"}
        # Renewing with a later token of the same user is fine; switching to another user is not.
        ws.send(json.dumps({"type": "auth", "token": site_token("user-3", ttl_s=900)}))
        assert recv(ws) == {"type": "authenticated"}
        ws.send(json.dumps({"type": "auth", "token": site_token("user-4")}))
        assert recv(ws)["code"] == "bad_request"
        ws.send(json.dumps({"type": "chat", "content": "Say hi.", "max_new_tokens": 2}))
        accepted = recv(ws)
        assert accepted["type"] == "accepted"
        while (frame := recv(ws))["type"] != "done":
            assert frame["type"] == "token"
    finally:
        ws.close()


def test_guest_tokens_go_to_allowed_origins_only_and_renew_into_the_same_guest(stack):
    url = stack.base_url + "/api/guest"
    assert requests.post(url, timeout=10).status_code == 403  # no Origin: not a page
    foreign = requests.post(url, headers={"Origin": "https://evil.test"}, timeout=10)
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "unauthorized"
    first = requests.post(url, headers={"Origin": stack.base_url}, timeout=10).json()
    assert first["expires_in"] == stack.settings.guest_token_ttl_s
    renewed = requests.post(url, headers={"Origin": stack.base_url, "Authorization": f"Bearer {first['token']}"},
                            timeout=10).json()
    other = requests.post(url, headers={"Origin": stack.base_url}, timeout=10).json()
    sub = lambda t: jwt.decode(t, options={"verify_signature": False})["sub"]  # noqa: E731
    assert sub(renewed["token"]) == sub(first["token"]) != sub(other["token"])
    # A site token is not a guest token: it renews into a new guest, not into the site's user.
    site = requests.post(url, headers={"Origin": stack.base_url, "Authorization": f"Bearer {site_token('user-1')}"},
                         timeout=10).json()
    assert sub(site["token"]) not in ("user-1", sub(first["token"]))


def test_with_guests_off_guest_tokens_are_refused_and_site_tokens_still_work(stack):
    guest = Client(stack.base_url).token  # issued while guests were allowed, by the same secret
    with second_web(stack, guests=False) as (base_url, _):
        refused = requests.post(base_url + "/api/guest", headers={"Origin": base_url}, timeout=10)
        assert refused.status_code == 401 and "signs its users in" in refused.json()["error"]["message"]
        res = requests.get(base_url + "/api/conversations", headers={"Authorization": f"Bearer {guest}"}, timeout=10)
        assert res.status_code == 401
        site = requests.get(base_url + "/api/conversations", timeout=10,
                            headers={"Authorization": f"Bearer {site_token('user-1')}"})
        assert site.status_code == 200


def test_guest_tokens_are_rate_limited_per_address(stack):
    with second_web(stack, guest_rate_per_minute=6, guest_rate_burst=2) as (base_url, _):
        answers = [requests.post(base_url + "/api/guest", headers={"Origin": base_url}, timeout=10)
                   for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[2].json()["error"]["code"] == "rate_limited"
        assert 1 <= int(answers[2].headers["Retry-After"]) <= 10


@contextmanager
def jwks_server(keys: list[dict]):
    """The embedding site's published keys, served on loopback."""
    with one_page_server(json.dumps({"keys": keys}).encode(), "application/json") as port:
        yield f"http://127.0.0.1:{port}/.well-known/jwks.json"


def test_tokens_signed_with_a_key_of_the_sites_jwks_are_accepted_and_others_not(stack):
    key, stranger = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    issuer = "https://keys.site.test"

    def token(signer, kid="site-key-1"):
        return jwt.encode({"iss": issuer, "sub": "user-9", "exp": int(time.time()) + 300}, signer,
                          algorithm="RS256", headers={"kid": kid})

    with jwks_server([{**public, "kid": "site-key-1", "use": "sig", "alg": "RS256"}]) as jwks_url, \
            second_web(stack, jwt_jwks_url=jwks_url, jwt_issuers=[issuer]) as (base_url, _):
        get = lambda t: requests.get(base_url + "/api/conversations", timeout=10,  # noqa: E731
                                     headers={"Authorization": f"Bearer {t}"})
        assert get(token(key)).status_code == 200
        assert get(token(stranger)).status_code == 401  # same kid, another key
        assert get(token(key, kid="unknown")).status_code == 401
        client = Client(base_url, token(key))
        try:
            _, _, done = client.chat("Say yes.", max_new_tokens=2)
            assert done["finish_reason"] in ("stop", "length")
        finally:
            client.close()


def test_past_its_socket_limit_a_web_process_refuses_the_handshake_at_once(stack):
    with second_web(stack, max_sockets=3) as (base_url, _):
        token = requests.post(base_url + "/api/guest", headers={"Origin": base_url}, timeout=10).json()["token"]
        held = [websocket.create_connection(ws_url(base_url, token), timeout=30) for _ in range(3)]
        try:
            started = time.monotonic()
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                websocket.create_connection(ws_url(base_url, token), timeout=30)
            print(f"refused in {time.monotonic() - started:.3f} s")
            assert refused.value.status_code == 503
            assert requests.get(base_url + "/healthz", timeout=5).status_code == 200
            held.pop().close()
            # The slot is free again once the server has seen the close.
            deadline = time.monotonic() + 30
            while True:
                try:
                    held.append(websocket.create_connection(ws_url(base_url, token), timeout=30))
                    break
                except websocket.WebSocketBadStatusException:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            held[-1].send(json.dumps({"type": "ping"}))
            assert recv(held[-1]) == {"type": "pong"}
        finally:
            for ws in held:
                ws.close()


def test_no_response_sets_a_cookie(stack):
    """Nothing a browser sends by itself identifies a caller, so no page of another site can act as one."""
    page = requests.get(stack.base_url + "/", timeout=10)
    guest = requests.post(stack.base_url + "/api/guest", headers={"Origin": stack.base_url}, timeout=10)
    listed = requests.get(stack.base_url + "/api/conversations", timeout=10,
                          headers={"Authorization": f"Bearer {guest.json()['token']}"})
    assert [r.status_code for r in (page, guest, listed)] == [200, 200, 200]
    assert not any("Set-Cookie" in r.headers for r in (page, guest, listed))

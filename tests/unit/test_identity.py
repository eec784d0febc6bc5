"""Tokens: who they name, which are refused, and how guest tokens renew."""

from __future__ import annotations

import time

import jwt
import pytest

from app.web.identity import GUEST_ISSUER, Identities, Unauthorized
from config.settings import Settings


def identities(**overrides) -> Identities:
    return Identities(Settings(secret_key="unit-secret", jwt_secret="site-secret-of-at-least-32-bytes!!", **overrides))


def sub(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["sub"]


def site(sub: str, iss: str = "https://site.test", ttl: float = 60, secret="site-secret-of-at-least-32-bytes!!"):
    return jwt.encode({"iss": iss, "sub": sub, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


def test_the_caller_is_issuer_plus_sub():
    assert identities().owner(site("u1")) == "https://site.test u1"


def test_an_expired_guest_token_renews_into_the_same_guest_until_the_renewal_window_ends(monkeypatch):
    ids = identities(guests=True, guest_token_ttl_s=60, guest_renew_s=3600)
    now = time.time()
    with monkeypatch.context() as m:  # issued 10 minutes ago: expired (ttl 60 s, leeway 30 s)
        m.setattr(time, "time", lambda: now - 600)
        first, _ = ids.guest_token()
    with pytest.raises(Unauthorized, match="expired"):
        ids.owner(first)
    renewed, _ = ids.guest_token(first)
    assert sub(renewed) == sub(first) and ids.owner(renewed) == f"{GUEST_ISSUER} {sub(first)}"
    with monkeypatch.context() as m:  # first issued two hours ago: past the renewal window
        m.setattr(time, "time", lambda: now - 7200)
        old, _ = ids.guest_token()
    assert sub(ids.guest_token(old)[0]) != sub(old)


def test_guest_tokens_are_refused_where_guests_are_off_and_cannot_be_forged_with_the_site_secret():
    on = identities(guests=True)
    token, _ = on.guest_token()
    with pytest.raises(Unauthorized, match="guests"):
        identities(guests=False).owner(token)
    forged = site("guest-123", iss=GUEST_ISSUER)  # signed with the site's secret, not the backend's
    with pytest.raises(Unauthorized):
        on.owner(forged)
    with pytest.raises(Unauthorized):  # nor by another backend's secret
        Identities(Settings(secret_key="other", guests=True)).owner(token)


def test_tokens_that_name_nobody_storable_are_refused():
    ids = identities()
    for bad in (site("x" * 300), site("u", iss="has space"), site(""), site("u\x00")):
        with pytest.raises(Unauthorized):
            ids.owner(bad)
    with pytest.raises(Unauthorized, match="too long"):
        ids.owner("a" * 10000)


def test_without_a_key_configured_site_tokens_are_refused_and_issuers_are_checked():
    with pytest.raises(Unauthorized, match="HS256"):
        Identities(Settings(secret_key="s")).owner(site("u"))
    with pytest.raises(Unauthorized, match="issuer"):
        identities(jwt_issuers=["https://other.test"]).owner(site("u"))

"""The web tier refuses to start where its defaults would be unsafe."""

from __future__ import annotations

import pytest

from app.web import create_app
from config.settings import Settings, on_loopback


def test_loopback_addresses_are_told_apart():
    assert all(on_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "localhost"))
    assert not any(on_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "chat.example.com"))


def test_the_default_secret_is_refused_outside_loopback():
    with pytest.raises(RuntimeError, match="CHAT_SECRET_KEY"):
        create_app(Settings(host="0.0.0.0"))
    app = create_app(Settings(host="0.0.0.0", secret_key="a long random value"))
    assert app.extensions["chat"].settings.secret_key == "a long random value"
    assert create_app(Settings(host="127.0.0.1")) is not None  # on loopback the default is fine

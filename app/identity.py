"""Who is calling. Until accounts exist, a caller is an anonymous id in a signed cookie."""

from __future__ import annotations

import uuid

from flask import session


def current_owner() -> str:
    """The caller's id, issued on first contact and kept in the session cookie."""
    owner = session.get("uid")
    if not owner:
        owner = "anon:" + uuid.uuid4().hex
        session["uid"] = owner
        session.permanent = True
    return owner

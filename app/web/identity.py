"""Who is calling: a user of the embedding site, named by a JWT that the site signs, or a guest.

A caller is the token's issuer plus its ``sub``. The site signs its users' tokens
with a shared HS256 secret (``CHAT_JWT_SECRET``) or with keys it publishes as a
JWKS (``CHAT_JWT_JWKS_URL``). Where guests are allowed (``CHAT_GUESTS``), the
backend signs short-lived guest tokens itself (``POST /api/guest``) with a key
derived from ``CHAT_SECRET_KEY``; a guest token that has expired still renews
into one for the same guest within ``CHAT_GUEST_RENEW_S`` of its first issue.
Tokens travel as ``Authorization: Bearer`` on HTTP and as ``?token=`` (or a
first ``auth`` frame) on the WebSocket, whose headers browsers cannot set. An
API key (made by ``python -m app.web.keys``) travels the same way and names a
caller of the same kind; its prefix tells it from a JWT.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid

from collections.abc import Callable

import jwt
from flask import current_app, request

from app.storage import API_KEY_PREFIX
from config.settings import Settings

GUEST_ISSUER = "urn:chatqueue:guest"
# The backend's own tokens; a site's tokens are asymmetric (JWKS) or HS256 with its shared secret.
GUEST_ALGORITHM = "HS256"
JWKS_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
# conversations.owner and chat_requests.owner hold "<issuer> <sub>".
MAX_OWNER_CHARS = 255
MAX_TOKEN_CHARS = 8192


class Unauthorized(Exception):
    """No token, or one that is expired, malformed, wrongly signed or from an issuer not accepted."""


class Identities:
    """Verifies callers' tokens and signs guest tokens; one per web process."""

    # A key's owner is looked up once in this long: a revoked key stops working within it.
    KEY_CACHE_S = 30.0

    def __init__(self, settings: Settings, key_owner: Callable[[str], str | None] | None = None):
        self.settings = settings
        self._key_owner = key_owner
        self._keys: dict[str, tuple[str | None, float]] = {}
        self._guest_key = hmac.new(settings.secret_key.encode(), b"guest-token", hashlib.sha256).digest()
        self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300, timeout=5) \
            if settings.jwt_jwks_url else None

    def owner(self, token: str) -> str:
        """The caller that ``token`` (a JWT or an API key) names, as ``"<issuer> <sub>"``; :class:`Unauthorized`
        if it names none."""
        if token.startswith(API_KEY_PREFIX):
            return self._api_key_owner(token)
        claims = self.verify(token)
        return owner_of(claims["iss"], claims["sub"])

    def _api_key_owner(self, key: str) -> str:
        if self._key_owner is None or len(key) > MAX_TOKEN_CHARS:
            raise Unauthorized("API keys are not accepted here")
        now = time.monotonic()
        owner, until = self._keys.get(key, (None, 0.0))
        if until <= now:
            owner = self._key_owner(key)
            if len(self._keys) > 10_000:  # bounded: keys tried at random do not grow it for ever
                self._keys.clear()
            self._keys[key] = (owner, now + self.KEY_CACHE_S)
        if owner is None:
            raise Unauthorized("unknown or revoked API key")
        return owner

    def verify(self, token: str, verify_exp: bool = True) -> dict:
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("missing token" if not token else "token too long")
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
            options = {"require": ["iss", "sub", "exp"], "verify_exp": verify_exp}
            leeway = self.settings.jwt_leeway_s
            if issuer == GUEST_ISSUER:
                if not self.settings.guests:
                    raise Unauthorized("guests are not allowed here")
                claims = jwt.decode(token, self._guest_key, algorithms=[GUEST_ALGORITHM], issuer=GUEST_ISSUER,
                                    options=options, leeway=leeway)
            else:
                claims = self._verify_site_token(token, issuer, options, leeway)
        except jwt.PyJWTError as exc:
            raise Unauthorized(_why(exc)) from None
        if not isinstance(claims["sub"], str) or not claims["sub"] or not isinstance(claims["iss"], str):
            raise Unauthorized("iss and sub must be non-empty strings")
        if any(c.isspace() for c in claims["iss"]) or len(claims["iss"]) + 1 + len(claims["sub"]) > MAX_OWNER_CHARS:
            raise Unauthorized(f"iss must have no spaces, and iss and sub together at most {MAX_OWNER_CHARS - 1} "
                               f"characters")
        if "\x00" in claims["sub"] or "\x00" in claims["iss"]:
            raise Unauthorized("iss and sub must not contain NUL characters")
        return claims

    def _verify_site_token(self, token: str, issuer, options: dict, leeway: float) -> dict:
        accepted = self.settings.jwt_issuers
        if accepted and issuer not in accepted:
            raise Unauthorized("issuer not accepted")
        audience = self.settings.jwt_audience or None
        if not audience:
            options = {**options, "verify_aud": False}
        header = jwt.get_unverified_header(token)
        if header.get("alg") == "HS256":
            if not self.settings.jwt_secret:
                raise Unauthorized("HS256 tokens are not accepted here (no shared secret is configured)")
            key = self.settings.jwt_secret
            algorithms = ["HS256"]
        elif self._jwks is not None:
            key = self._jwks.get_signing_key_from_jwt(token).key
            algorithms = JWKS_ALGORITHMS
        else:
            raise Unauthorized("no key to verify this token (configure CHAT_JWT_SECRET or CHAT_JWT_JWKS_URL)")
        return jwt.decode(token, key, algorithms=algorithms, audience=audience, options=options, leeway=leeway)

    def guest_token(self, previous: str | None = None) -> tuple[str, int]:
        """A new guest token and its lifetime in seconds: for the guest of ``previous`` (a guest token, expired or
        not) while it is renewable, else for a new guest."""
        now = int(time.time())
        sub, first = None, now
        if previous:
            try:
                claims = self.verify(previous, verify_exp=False)
            except Unauthorized:
                claims = None
            if claims and claims["iss"] == GUEST_ISSUER and now - int(claims.get("first", now)) \
                    <= self.settings.guest_renew_s:
                sub, first = claims["sub"], int(claims.get("first", now))
        ttl = self.settings.guest_token_ttl_s
        claims = {"iss": GUEST_ISSUER, "sub": sub or "guest-" + uuid.uuid4().hex, "iat": now, "exp": now + ttl,
                  "first": first}
        return jwt.encode(claims, self._guest_key, algorithm=GUEST_ALGORITHM), ttl


def owner_of(issuer: str, sub: str) -> str:
    return f"{issuer} {sub}"


def _why(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature does not verify"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim!r} claim"
    if isinstance(exc, (jwt.InvalidIssuerError, jwt.InvalidAudienceError)):
        return f"token {'issuer' if isinstance(exc, jwt.InvalidIssuerError) else 'audience'} not accepted"
    if isinstance(exc, jwt.PyJWKClientError):
        return "no published key verifies this token"
    return "malformed token"


def bearer_token() -> str | None:
    """The token of this request: ``Authorization: Bearer``, or (for the WebSocket) ``?token=``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.args.get("token") or None


def origin_allowed(origin: str) -> bool:
    """Whether a page of ``origin`` may use this backend: the same host, or one of ``CHAT_ALLOWED_ORIGINS``."""
    return origin in current_app.extensions["chat"].settings.allowed_origins \
        or origin.split("://", 1)[-1] == request.host


def current_owner() -> str:
    """The caller of this HTTP request; :class:`Unauthorized` when it names none."""
    identities: Identities = current_app.extensions["chat"].identities
    return identities.owner(bearer_token() or "")

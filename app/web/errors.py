"""One way to build HTTP errors, and the handlers that turn failures into them."""

from __future__ import annotations

import logging
import math

import redis
from flask import Flask, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from app.protocol import HTTP_STATUS, ErrorCode
from app.web.identity import Unauthorized

logger = logging.getLogger(__name__)

_HTTP_CODES = {400: ErrorCode.BAD_REQUEST, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.UNAUTHORIZED,
               404: ErrorCode.NOT_FOUND, 405: ErrorCode.BAD_REQUEST, 413: ErrorCode.TOO_LARGE,
               429: ErrorCode.RATE_LIMITED, 503: ErrorCode.UNAVAILABLE}


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least one, where a refusal says when to come back."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds is not None else {}


def error_response(code: ErrorCode, message: str, status: int | None = None, retry_after: float | None = None):
    """``{"error": {"code", "message"}}`` with the status that matches the code, and ``Retry-After``."""
    headers = retry_after_header(retry_after)
    return jsonify({"error": {"code": code.value, "message": message}}), status or HTTP_STATUS[code], headers


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = _HTTP_CODES.get(exc.code, ErrorCode.INTERNAL if exc.code >= 500 else ErrorCode.BAD_REQUEST)
        return error_response(code, exc.description or exc.name, exc.code)

    @app.errorhandler(Unauthorized)
    def _unauthorized(exc: Unauthorized):
        res, status, headers = error_response(ErrorCode.UNAUTHORIZED, str(exc))
        return res, status, {**headers, "WWW-Authenticate": 'Bearer realm="chat"'}

    @app.errorhandler(OperationalError)
    @app.errorhandler(redis.RedisError)
    def _unavailable(exc: Exception):
        logger.error("Backing service unavailable: %s", exc)
        return error_response(ErrorCode.UNAVAILABLE, "a backing service is unavailable; try again")

    @app.errorhandler(Exception)
    def _internal(exc: Exception):
        logger.exception("Unhandled error")
        return error_response(ErrorCode.INTERNAL, "internal error")

"""The dashboard's guards: CSRF tokens (double-submit cookie) and the standalone logins."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request

if TYPE_CHECKING:
    from starlette.responses import Response

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "TOKEN_COOKIE",
    "BasicAuth",
    "LoginRequired",
    "TokenAuth",
    "check_csrf",
    "csrf_cookie",
    "csrf_form_token",
    "set_csrf_cookie",
]

CSRF_COOKIE = "taskiq_beat_csrf"
CSRF_FIELD = "csrf_token"
TOKEN_COOKIE = "taskiq_beat_session"


def cookie_path(request: Request) -> str:
    """The path the dashboard is mounted at: its cookies go to it alone."""
    return str(request.scope.get("root_path") or "") + "/"


def csrf_cookie(request: Request) -> tuple[str, bool]:
    """The request's CSRF cookie value, and whether it is new (then the response sets it)."""
    value = request.cookies.get(CSRF_COOKIE)
    if value and 20 <= len(value) <= 100:
        return value, False
    return secrets.token_urlsafe(32), True


def csrf_form_token(secret: bytes, cookie: str) -> str:
    """The token the forms carry: a keyed hash of the cookie. Someone able to plant a cookie
    (a sibling subdomain can) still cannot make the matching token without ``secret``."""
    return hmac.new(secret, cookie.encode(), hashlib.sha256).hexdigest()


def set_csrf_cookie(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        CSRF_COOKIE,
        value,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=cookie_path(request),
    )


def check_csrf(request: Request, form: dict[str, str], secret: bytes) -> None:
    """Refuse (403) a form whose token is missing or does not belong to the cookie: a page of
    another site can make the browser post here, but can neither read the cookie nor the
    token of a page of this dashboard."""
    cookie = request.cookies.get(CSRF_COOKIE)
    sent = form.get(CSRF_FIELD)
    if not cookie or not sent or not hmac.compare_digest(csrf_form_token(secret, cookie), sent):
        raise HTTPException(
            status_code=403,
            detail="The form's security token is missing or out of date (CSRF check). "
            "Reload the page and try again.",
        )


class LoginRequired(HTTPException):
    """No valid token: the dashboard answers 401 with its login form."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=401, detail=detail)


class TokenAuth:
    """A dependency that admits a request carrying ``token``: as ``Authorization: Bearer``,
    or as the session cookie the login form sets (a keyed hash of the token, not the token)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token: expected a non-empty string")
        self._token = token
        self.session_value = hmac.new(
            token.encode(), b"taskiq-beat dashboard session", hashlib.sha256
        ).hexdigest()

    def matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token.encode())

    async def __call__(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and self.matches(header[7:].strip()):
            return
        cookie = request.cookies.get(TOKEN_COOKIE, "")
        if cookie and hmac.compare_digest(cookie, self.session_value):
            return
        raise LoginRequired("Enter the dashboard's access token.")


class BasicAuth:
    """A dependency that admits HTTP basic auth with ``username`` and ``password``."""

    def __init__(self, username: str, password: str) -> None:
        if not username or not password:
            raise ValueError("basic auth: expected a user name and a password")
        self._expected = f"{username}:{password}".encode()

    async def __call__(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        given = b""
        if header.lower().startswith("basic "):
            try:
                given = base64.b64decode(header[6:].strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
        if not given or not hmac.compare_digest(given, self._expected):
            raise HTTPException(
                status_code=401,
                detail="This dashboard needs a user name and password.",
                headers={"WWW-Authenticate": 'Basic realm="taskiq-beat", charset="UTF-8"'},
            )

"""Who may use the app's server: an access token on every request, and the browser origins allowed to call it.

MONAI Label 0.8.5's own authentication (``MONAI_LABEL_AUTH_ENABLE``) needs a Keycloak server; without it
every endpoint is open to anyone who reaches the port, and its CORS setup answers any origin with
credentials allowed. This app replaces both, in the server process only:

- **Access token** (:func:`access_token`): ``$SURGICALSAM_TOKEN`` when set (at least 16 characters), else
  the token kept in ``<studies>/.surgicalsam_token`` (mode 0600), made with ``secrets.token_urlsafe`` at the
  first start and printed once on the server's console. Every request must carry it as
  ``Authorization: Bearer <token>`` (what MONAI Label's client, 3D Slicer's MONAI Label module and the review
  page send), except the review page's own static files (it asks for the token) and ``POST /auth/token``
  (a client trading the token for itself, as 3D Slicer's module does with a password). ``--conf auth false``
  turns the check off (e.g. behind a proxy that authenticates).
- **Origins** (:func:`protect`): none by default; MONAI Label's own setting ``MONAI_LABEL_CORS_ORIGINS``
  (a JSON list in the environment) lists those a browser page may call the API from. No cookies are used, so
  no credentials are allowed cross-origin.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import sys

logger = logging.getLogger(__name__)

TOKEN_ENV = "SURGICALSAM_TOKEN"
TOKEN_FILE = ".surgicalsam_token"
MIN_TOKEN_LENGTH = 16
#: paths served without the token: the review page's static files (HTML/JS/CSS, no data) and the token exchange
OPEN_PREFIXES = ("/review/", "/favicon.ico")
OPEN_PATHS = ("/review", "/auth/", "/auth/token")


class AuthSetupError(RuntimeError):
    """The token cannot be used as configured; the message says what to do."""


def token_file(studies: str) -> str:
    return os.path.join(os.path.abspath(studies), TOKEN_FILE)


def access_token(studies: str) -> tuple[str, str]:
    """``(token, where it comes from)``: ``$SURGICALSAM_TOKEN``, else the studies folder's token file, made
    (0600, printed once on the console) when missing.

    Raises:
        AuthSetupError: a token shorter than 16 characters, or a token file others may read.
    """
    given = os.environ.get(TOKEN_ENV)
    if given is not None:
        if len(given.strip()) < MIN_TOKEN_LENGTH:
            raise AuthSetupError(
                f"${TOKEN_ENV} is {len(given.strip())} characters: use at least {MIN_TOKEN_LENGTH} "
                f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return given.strip(), f"${TOKEN_ENV}"
    path = token_file(studies)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise AuthSetupError(
                f"{path} may be read by other users (mode {mode:o}): run `chmod 600 {path}`, or "
                f"delete it to have a new token made"
            ) from None
        with open(path) as handle:
            token = handle.read().strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise AuthSetupError(
                f"{path} holds no token of at least {MIN_TOKEN_LENGTH} characters: delete it to have "
                "a new token made, or write one there"
            )
        return token, path
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    # printed on the console only (MONAI Label's log file and GET /logs/ never hold it)
    print(
        f"\nSurgicalSAM app: new access token (kept in {path}, mode 0600; send it as "
        f"'Authorization: Bearer <token>'):\n\n    {token}\n",
        file=sys.stderr,
        flush=True,
    )
    return token, path


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header among raw ASGI headers (None when absent)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenMiddleware:
    """ASGI middleware: HTTP and websocket requests without the token are answered 401 (the review page's static
    files and the token exchange excepted)."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def is_open(self, scope) -> bool:
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            return True
        return scope.get("method", "GET") in ("GET", "HEAD") and path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.is_open(scope):
            return await self.app(scope, receive, send)
        token = bearer_token(scope.get("headers") or [])
        if token is not None and hmac.compare_digest(token.encode(), self.token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        from starlette.responses import JSONResponse

        detail = (
            "this server needs its access token: send 'Authorization: Bearer <token>' (the token is in the "
            f"studies folder's {TOKEN_FILE} or ${TOKEN_ENV}; see the app README, 'Security')"
        )
        if token is not None:
            detail = "wrong access token: " + detail
        response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def allowed_origins() -> list[str]:
    """MONAI Label's ``MONAI_LABEL_CORS_ORIGINS`` (none by default: no page of another origin may call the API)."""
    from monailabel.config import settings

    return [str(origin).rstrip("/") for origin in settings.MONAI_LABEL_CORS_ORIGINS or []]


def protect(fastapi_app, token: str | None) -> None:
    """Rebuild MONAI Label's middleware: CORS for :func:`allowed_origins` only (it allowed any origin, with
    credentials), then the token check (none when ``token`` is None). Safe to call while the server starts:
    the app reads its middleware stack at each request."""
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware

    origins = allowed_origins()
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    ]
    if token is not None:
        middleware.append(Middleware(TokenMiddleware, token=token))
    fastapi_app.user_middleware = middleware
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    if token is not None:
        _install_auth_routes(fastapi_app, token)
    logger.info(
        "SurgicalSAM app: %s; browser origins allowed: %s",
        "access token required" if token is not None else "NO ACCESS TOKEN (--conf auth false)",
        origins or "none",
    )


def _install_auth_routes(fastapi_app, token: str) -> None:
    """MONAI Label's ``/auth/`` endpoints (its client's ``auth_enabled``, ``auth_token``, ``auth_valid_token``;
    3D Slicer's module uses them), served with the app's token: ``POST /auth/token`` with the token as the
    password (any user name) answers ``{"access_token": <token>, "token_type": "Bearer"}``."""
    from fastapi import Form, HTTPException
    from fastapi.routing import APIRoute

    async def auth_enabled():
        return {"enabled": True, "client_id": "surgicalsam", "realm": None}

    async def auth_token(username: str = Form(""), password: str = Form("")):
        if not hmac.compare_digest(password.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="wrong access token (send it as the password)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return {"access_token": token, "token_type": "Bearer"}

    async def auth_token_valid():  # behind TokenMiddleware: reached only with the token
        return {"username": "token", "roles": []}

    routes = fastapi_app.router.routes
    if any(getattr(r, "name", "") == "surgicalsam_auth_enabled" for r in routes):
        return
    for path, method, endpoint in (
        ("/auth/token/valid", "GET", auth_token_valid),
        ("/auth/token", "POST", auth_token),
        ("/auth/", "GET", auth_enabled),
    ):
        routes.insert(
            0,
            APIRoute(
                path, endpoint, methods=[method], name=f"surgicalsam_{endpoint.__name__}", include_in_schema=False
            ),
        )

"""wsfanout inside this project: who a websocket's user is (Django's session), and what
to do when users come and go (a log line here; the webhook in views.py records them).

``chat`` is the ASGI app that asgi.py serves under /ws/, and the object views publish with.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django import db
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.base_user import AbstractBaseUser
from django.http.cookie import parse_cookie
from django.utils.crypto import constant_time_compare

from wsfanout import Identity, Settings, create_app
from wsfanout.types import Scope

log = logging.getLogger(__name__)


async def authenticate(scope: Scope) -> Identity | None:
    """The Django user whose session cookie came with this handshake (or request), or None."""
    cookies = "; ".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"cookie")
    session_key = parse_cookie(cookies).get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None
    return await sync_to_async(_identity)(session_key)


def _identity(session_key: str) -> Identity | None:
    # Django's ORM wants a request's bookends around its work: drop connections that are
    # broken or too old, as it does before and after every request.
    db.close_old_connections()
    try:
        user = _user(session_key)
        if user is None:
            return None
        groups = [group.name for group in user.groups.all()]
        return Identity(user.get_username(), groups=groups, name=user.first_name or None)
    finally:
        db.close_old_connections()


def _user(session_key: str) -> AbstractBaseUser | None:
    """What ``django.contrib.auth.get_user`` finds, read only: a session that no longer
    matches the user's password is refused here, not flushed or rotated (that is the
    Django request's job; a websocket has no response to carry a new cookie)."""
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    try:
        user_id = get_user_model()._meta.pk.to_python(session[SESSION_KEY])
        backend_path = session[BACKEND_SESSION_KEY]
    except KeyError:  # an unknown, expired or anonymous session
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = load_backend(backend_path).get_user(user_id)  # None if gone or inactive
    if user is None:
        return None
    given = session.get(HASH_SESSION_KEY) or ""
    expected = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    if not any(constant_time_compare(given, wanted) for wanted in expected):
        return None
    return user


def on_event(event: dict[str, Any]) -> None:
    """Each lifecycle event, in order, in a worker thread of wsfanout's (DESIGN 12)."""
    log.info("wsfanout: %s %s", event["type"], event["user"])


chat = create_app(
    # Django logs users in and out: wsfanout serves no page, /login or /logout of its own.
    dataclasses.replace(Settings.from_env(), pages=False),
    authenticate=authenticate,
    hooks=on_event,
)

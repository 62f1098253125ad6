"""wsfanout embedded in a host app whose own login decides who connects: a stand-in for
the host's session, the cookie ``host_user=<name>`` (never do this for real: the host's
session cookie is signed), and ``host_ttl=<seconds>`` for a sliding session that the host
renews at every handshake. Served by real servers in tests (``tests.hosted:app``)."""

from __future__ import annotations

import time

from wsfanout import Identity, Settings, create_app
from wsfanout.http import cookies
from wsfanout.types import Scope


def authenticate(scope: Scope) -> Identity | None:
    given = cookies(scope)
    user, ttl = given.get("host_user"), given.get("host_ttl")
    expires = time.time() + float(ttl) if ttl else None
    return Identity(user, groups=("chess",), expires=expires) if user else None


app = create_app(Settings.from_env(), authenticate=authenticate)

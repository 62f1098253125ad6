"""wsfanout embedded in a host app whose own login decides who connects: a stand-in for
the host's session, the cookie ``host_user=<name>`` (never do this for real: the host's
session cookie is signed). Served by real servers in tests (``tests.hosted:app``)."""

from __future__ import annotations

from wsfanout import Identity, Settings, create_app
from wsfanout.http import cookies
from wsfanout.types import Scope


def authenticate(scope: Scope) -> Identity | None:
    user = cookies(scope).get("host_user")
    return Identity(user, groups=("chess",)) if user else None


app = create_app(Settings.from_env(), authenticate=authenticate)

"""Mint a wsfanout connection token (HS256) and print it.

    WSFANOUT_JWT_SECRET=... python examples/mint_token.py greg boys chess

The secret is the one the nodes read from WSFANOUT_JWT_SECRET (at least 32 bytes). A page
connects with ws://host/?token=<token>; another client may send Authorization: Bearer <token>.
(Not named token.py: a script of that name would stand in for the standard library's
``token`` module, which PyJWT's imports need.)
"""

import os
import sys
import time

import jwt  # pip install 'PyJWT[crypto]'


def wsfanout_token(username: str, groups: list[str], name: str = "") -> str:
    claims = {"sub": username, "groups": groups, "name": name, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, os.environ["WSFANOUT_JWT_SECRET"], algorithm="HS256")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: mint_token.py USERNAME [GROUP ...]")
    print(wsfanout_token(sys.argv[1], sys.argv[2:]))

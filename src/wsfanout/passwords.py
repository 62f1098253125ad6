"""Password hashing: scrypt, self-describing, verified in constant time.

A stored hash reads ``scrypt$n$r$p$salt$hash`` (salt and hash in urlsafe
base64), so the cost can be raised later without breaking old hashes. These
functions block for tens of milliseconds: call them through
``asyncio.to_thread``, never on the event loop thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from typing import Final

N: Final = 2**14
R: Final = 8
P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
_MAX_N: Final = 2**20
MAX_LENGTH: Final = 1024  # characters: the longest a password may be set to, or logged in with


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * 1024 * 1024
    )


def hash_password(password: str) -> str:
    """A new self-describing hash with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, N, R, P, HASH_BYTES)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; False for any malformed hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        n_, r_, p_ = int(n), int(r), int(p)
        expected = _unb64(digest)
        salt_bytes = _unb64(salt)
    except ValueError:
        return False
    if scheme != "scrypt" or not (2 <= n_ <= _MAX_N and 1 <= r_ <= 32 and 1 <= p_ <= 16):
        return False
    if not 16 <= len(expected) <= 64:
        return False
    actual = _scrypt(password, salt_bytes, n_, r_, p_, len(expected))
    return hmac.compare_digest(actual, expected)


def length_problem(password: str, minimum: int) -> str | None:
    """Why this password may not be set (``minimum``: ``WSFANOUT_MIN_PASSWORD_LENGTH``),
    or None when it may."""
    if len(password) < minimum:
        return (
            f"a password has at least {minimum} characters (WSFANOUT_MIN_PASSWORD_LENGTH); "
            f"this one has {len(password)}"
        )
    if len(password) > MAX_LENGTH:
        return f"a password has at most {MAX_LENGTH} characters"
    return None


@functools.cache
def dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so that a wrong
    username costs as long as a wrong password and does not reveal who exists."""
    return hash_password(secrets.token_urlsafe(16))

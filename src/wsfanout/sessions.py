"""Session cookies: issue and verify (pure: no file I/O; the key comes from the service).

The cookie holds a ``MultiFernet`` token: encrypted, authenticated, and stamped
with its issue time, which ``verify`` checks against the max age. Each
configured secret is stretched into a Fernet key with HKDF; the first key
signs, every key verifies, so secrets rotate by prepending a new one. A bad,
expired or foreign token means anonymous, never an error.

The token also names a server-side session (its id, from the store), so a cookie can be
revoked before its max age: ``verify`` only proves the cookie is ours and young enough;
the caller asks the store whether its session is still live. A cookie from before
sessions were revocable names none, and is refused (its user logs in again).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE_NAME: Final = "wsfanout_session"
_HKDF_INFO: Final = b"wsfanout session cookie v1"
MAX_TOKEN_CHARS: Final = 4096
VERIFIED_CACHE: Final = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    user_id: int
    username: str
    issued_at: float
    session_id: str

    def expires_at(self, max_age: float) -> float:
        return self.issued_at + max_age


def _fernet(secret: str) -> Fernet:
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return Fernet(base64.urlsafe_b64encode(kdf.derive(secret.encode())))


class SessionCodec:
    """Turns a user into a cookie value and back."""

    def __init__(
        self,
        secrets_: tuple[str, ...],
        max_age: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets_:
            raise ValueError("at least one secret key is needed")
        self._fernet = MultiFernet([_fernet(secret) for secret in secrets_])
        self.max_age = max_age
        self.clock = clock
        # Tokens already verified, so a user's reconnects and extra tabs skip the
        # decryption; expiry is still checked on every use.
        self._verified: dict[str, Session] = {}

    def issue(self, user_id: int, username: str, session_id: str, now: float | None = None) -> str:
        """A token for this user's session, stamped with ``now``."""
        payload = orjson.dumps({"uid": user_id, "u": username, "sid": session_id})
        issued = int(self.clock() if now is None else now)
        return self._fernet.encrypt_at_time(payload, issued).decode()

    def verify(self, token: str | None, now: float | None = None) -> Session | None:
        """The session in a token, or None if it is missing, forged, foreign or expired."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        current = int(self.clock() if now is None else now)
        session = self._verified.get(token)
        if session is None:
            session = self._decrypt(token, current)
            if session is None:
                return None
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()
            self._verified[token] = session
        if not session.issued_at <= current + 60 or current > session.issued_at + self.max_age:
            return None
        return session

    def _decrypt(self, token: str, current: int) -> Session | None:
        try:
            raw = token.encode("ascii")
            payload = self._fernet.decrypt_at_time(raw, int(self.max_age), current)
            # Authentic now, so its header can be read directly: version, then the time.
            issued = int.from_bytes(base64.urlsafe_b64decode(raw[:12])[1:9], "big")
            data = orjson.loads(payload)
            user_id, username, session_id = data["uid"], data["u"], data["sid"]
        except (InvalidToken, UnicodeEncodeError, orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if (
            not isinstance(user_id, int)
            or not isinstance(username, str)
            or not isinstance(session_id, str)
        ):
            return None
        return Session(
            user_id=user_id, username=username, issued_at=float(issued), session_id=session_id
        )

"""Connection tokens: JWTs minted by the operator's own backend, verified with PyJWT.

Theory of operation. An operator whose backend already knows its users hands each
client a JWT; the handshake passes it to ``TokenVerifier.verify()``, which returns
the ``Claims`` the connection runs as, or raises ``TokenError`` whose ``reason`` is
logged (the client is told only "invalid token"). No user row is needed.

What is checked, in order, cheapest first:

1. Shape: at most ``MAX_TOKEN_CHARS`` characters, ASCII, three dot-separated
   segments. Anything else is refused before a byte is decoded.
2. Algorithm, pinned per key. Each configured key admits exactly one algorithm:
   the shared secret HS256, an RSA public key RS256, an EC P-256 public key ES256.
   The token's header names its ``alg``; if no configured key admits it the token
   is refused, and otherwise ``jwt.decode`` runs with ``algorithms=[alg]`` and that
   one key. The header only *selects*; it never widens what a key may verify. This
   is what defeats algorithm confusion: were a public key allowed to verify HS256,
   anyone could sign an HS256 token using the (public!) PEM text as the HMAC secret.
   It also refuses ``alg: none`` and every algorithm we were not told to expect.
3. Signature and format, by PyJWT: base64url, JSON objects, the signature itself,
   ``crit`` headers, ``sub``/``jti`` types, and ``aud`` (none is configured, so a
   token that names an audience is refused: it was minted for someone else).
4. Claims: ``sub`` and ``exp`` required; ``sub`` a valid username, ``groups`` a
   list of valid group names, ``name`` a short printable first name.
5. Time, against the injected clock rather than PyJWT's wall clock, so tests and
   callers share one notion of now: ``exp`` must be in the future, ``nbf`` and
   ``iat`` not (``exp`` give or take ``leeway`` seconds; ``nbf`` and ``iat`` also
   ``SKEW`` more, as backends stamp ``iat`` with their own clock).

Steps 1 to 4 depend only on the token and the keys, so their result is cached
(keyed by the token's SHA-256, so the cache's size does not depend on the tokens'):
a client that reconnects with the same token skips the signature check. Step 5
depends on the time and runs on every call, cached or not.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidSubjectError
from jwt.types import Options

from .protocol import GROUP_RE, MAX_FIRST_NAME, USERNAME_RE

# Limits
SKEW: Final = 30.0  # seconds a token's nbf / iat may lie ahead of our clock
MAX_TOKEN_CHARS: Final = 8192
MAX_GROUPS: Final = 1000
MIN_SECRET_BYTES: Final = 32  # HS256: no shorter than the SHA-256 output (RFC 7518 §3.2)
MIN_RSA_BITS: Final = 2048
CACHE_ENTRIES: Final = 10_000  # verified tokens remembered; cleared when full
_REASON_CHARS: Final = 200

Key = str | RSAPublicKey | EllipticCurvePublicKey

_OPTIONS: Final[Options] = {
    "require": ["sub", "exp"],
    # Time is checked in _check_time, against the injected clock.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "enforce_minimum_key_length": True,
}


class KeyConfigError(ValueError):
    """A configured key (``WSFANOUT_JWT_SECRET`` / ``_PUBLIC_KEY``) cannot be used; the
    message says which and why."""


class TokenError(Exception):
    """A token that is refused; ``reason`` is one line fit for a log."""

    def __init__(self, reason: str) -> None:
        # Parts of the reason can come from the token, which anyone can write.
        line = "".join(c if c.isprintable() else "?" for c in reason)
        if len(line) > _REASON_CHARS:
            line = line[: _REASON_CHARS - 3] + "..."
        super().__init__(line)
        self.reason = line


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its holder."""

    username: str  # `sub`
    groups: tuple[str, ...]  # `groups`, deduplicated and sorted; () when absent
    expires_at: float  # `exp`, seconds since the epoch
    name: str  # `name` (the first name), or ""


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: Claims
    not_before: float | None  # the later of `nbf` and `iat`, if either is present


class TokenVerifier:
    """Verifies connection tokens against the configured keys."""

    def __init__(
        self,
        secret: str = "",
        public_key: str = "",
        *,
        clock: Callable[[], float] = time.time,
        leeway: float = 0,
    ) -> None:
        """Load the keys.

        Args:
            secret: the HS256 shared secret (``WSFANOUT_JWT_SECRET``), or "".
            public_key: a PEM public key (``WSFANOUT_JWT_PUBLIC_KEY``), RSA for RS256
                or EC P-256 for ES256: the PEM text itself, or the path of a file
                holding it; or "".
            clock: seconds since the epoch, for ``exp``, ``nbf`` and ``iat``.
            leeway: seconds of clock skew tolerated in those checks.

        Raises:
            ValueError: the secret is too short, or the public key cannot be read,
                is not a PEM public key, or is of an unsupported type or size.
        """
        self._keys: dict[str, Key] = {}
        if secret:
            self._keys["HS256"] = _load_secret(secret)
        if public_key:
            alg, key = _load_public_key(public_key)
            self._keys[alg] = key
        self._clock = clock
        self._leeway = leeway
        self._cache: dict[bytes, _Verified] = {}

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (otherwise every token is refused)."""
        return bool(self._keys)

    def verify(self, token: str) -> Claims:
        """Check a token and return its claims.

        Raises:
            TokenError: the token is refused; ``reason`` says why.
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(f"too long ({len(token)} characters; the limit is {MAX_TOKEN_CHARS})")
        if not token.isascii():
            raise TokenError("malformed: not ASCII")
        segments = token.count(".") + 1
        if segments != 3:
            raise TokenError(f"malformed: {segments} segments, a JWT has 3")
        digest = hashlib.sha256(token.encode()).digest()
        verified = self._cache.get(digest)
        if verified is None:
            verified = self._verify_uncached(token)
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[digest] = verified
        self._check_time(verified)
        return verified.claims

    def _verify_uncached(self, token: str) -> _Verified:
        if not self._keys:
            raise TokenError("tokens are not configured (no secret or public key)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenError(f"malformed: header 'alg' is {_show(alg)}, not a string")
        key = self._keys.get(alg)
        if key is None:
            allowed = ", ".join(sorted(self._keys))
            raise TokenError(f"algorithm {_show(alg)} not allowed (configured: {allowed})")
        try:
            payload = jwt.decode(token, key, algorithms=[alg], options=_OPTIONS)
        except jwt.InvalidSignatureError:
            raise TokenError(f"bad signature ({alg})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"missing claim {exc.claim!r}") from None
        except InvalidSubjectError:
            raise TokenError("claim 'sub' must be a string") from None
        except jwt.InvalidAudienceError:
            raise TokenError("has an 'aud' claim, but no audience is configured") from None
        except jwt.DecodeError as exc:
            raise TokenError(f"malformed: {exc}") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid: {exc}") from None
        return _Verified(_claims(payload), _not_before(payload))

    def _check_time(self, verified: _Verified) -> None:
        now = self._clock()
        exp = verified.claims.expires_at
        if exp <= now - self._leeway:
            raise TokenError(f"expired ({now - exp:.0f} s ago)")
        # A backend's clock a little ahead of ours must not make fresh tokens fail.
        if verified.not_before is not None and verified.not_before > now + self._leeway + SKEW:
            raise TokenError(f"not yet valid (for another {verified.not_before - now:.0f} s)")


def _load_secret(secret: str) -> str:
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        raise KeyConfigError(
            f"WSFANOUT_JWT_SECRET is {size} bytes; HS256 needs at least {MIN_SECRET_BYTES} "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    try:
        # PyJWT refuses a PEM or SSH key as an HMAC secret (it smells of confusion).
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError as exc:
        raise KeyConfigError(
            f"WSFANOUT_JWT_SECRET is not usable as an HS256 secret: {exc}"
        ) from None
    return secret


def _load_public_key(public_key: str) -> tuple[str, Key]:
    """Return the algorithm the key admits and the loaded key."""
    if "-----BEGIN" in public_key:
        pem, where = public_key.strip().encode(), "WSFANOUT_JWT_PUBLIC_KEY"
    else:
        where = f"WSFANOUT_JWT_PUBLIC_KEY file {public_key!r}"
        try:
            pem = Path(public_key).read_bytes().strip()
        except OSError as exc:
            raise KeyConfigError(
                f"WSFANOUT_JWT_PUBLIC_KEY is neither PEM text nor a readable file: {exc}"
            ) from None
    if b"PRIVATE KEY-----" in pem:
        raise KeyConfigError(
            f"{where} holds a private key; give the public key instead "
            "(openssl pkey -in private.pem -pubout), the private one stays with the issuer"
        )
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyConfigError(
            f"{where} is not a PEM public key (-----BEGIN PUBLIC KEY-----): {exc}"
        ) from None
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyConfigError(f"{where}: RSA key of {key.key_size} bits; at least 2048 needed")
        return "RS256", key
    if isinstance(key, EllipticCurvePublicKey):
        if not isinstance(key.curve, SECP256R1):
            raise KeyConfigError(f"{where}: EC key on curve {key.curve.name}; ES256 needs P-256")
        return "ES256", key
    raise KeyConfigError(
        f"{where}: {type(key).__name__} keys are not supported; use RSA or EC P-256"
    )


def _claims(payload: dict[str, Any]) -> Claims:
    sub = payload["sub"]  # PyJWT checked it is present and a string
    if not USERNAME_RE.fullmatch(sub):
        raise TokenError(f"claim 'sub' is not a valid username: {_show(sub)}")
    return Claims(
        username=sub,
        groups=_groups(payload.get("groups")),
        expires_at=_number(payload, "exp"),
        name=_name(payload.get("name")),
    )


def _groups(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TokenError(f"claim 'groups' must be a list, not {type(value).__name__}")
    if len(value) > MAX_GROUPS:
        raise TokenError(f"claim 'groups' has {len(value)} entries; at most {MAX_GROUPS}")
    for group in value:
        if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
            raise TokenError(f"claim 'groups' holds an invalid group name: {_show(group)}")
    return tuple(sorted(set(value)))


def _name(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TokenError(f"claim 'name' must be a string, not {type(value).__name__}")
    name = value.strip()  # as the store does with a first name
    if len(name) > MAX_FIRST_NAME or not name.isprintable():
        raise TokenError(f"claim 'name' must be printable, at most {MAX_FIRST_NAME} characters")
    return name


def _number(payload: dict[str, Any], claim: str) -> float:
    value = payload[claim]
    # bool is an int to Python, json accepts NaN and Infinity, and an int can
    # outgrow a float: none of these is a time.
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    raise TokenError(f"claim {claim!r} must be a number of seconds, not {_show(value)}")


def _not_before(payload: dict[str, Any]) -> float | None:
    times = [_number(payload, claim) for claim in ("nbf", "iat") if claim in payload]
    return max(times, default=None)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

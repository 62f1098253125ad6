"""tokens: JWT connection tokens, the algorithm pinned per key, time from the injected clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from wsfanout.tokens import MAX_TOKEN_CHARS, SKEW, Claims, TokenError, TokenVerifier

SECRET = "s" * 32
NOW = 1_700_000_000.0  # far from the real time: PyJWT's own clock must play no part


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """The issuer's RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """The issuer's EC P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def payload(**changes: Any) -> dict[str, Any]:
    """Good claims, with `changes` applied (a value of ... removes the claim)."""
    claims: dict[str, Any] = {
        "sub": "alice",
        "exp": int(NOW) + 60,
        "groups": ["ops", "dev", "ops"],
        "name": "Alice",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not ...}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64json(value: object) -> str:
    return b64(json.dumps(value).encode())


def hs256_by_hand(secret: bytes, header: dict[str, Any], body: str) -> str:
    """An HS256 token over any payload segment, signed without PyJWT's key checks."""
    signing_input = f"{b64json(header)}.{body}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def refused(verifier: TokenVerifier, token: str) -> str:
    """The reason `verifier` gives for refusing `token`."""
    with pytest.raises(TokenError) as exc:
        verifier.verify(token)
    assert "\n" not in exc.value.reason
    return exc.value.reason


@pytest.fixture
def clock() -> Clock:
    """The verifier's clock, at NOW."""
    return Clock()


@pytest.fixture
def hs(clock: Clock) -> TokenVerifier:
    """A verifier with only the shared secret."""
    return TokenVerifier(secret=SECRET, clock=clock)


# Good tokens


def test_hs256_token_gives_its_claims(hs: TokenVerifier) -> None:
    """An HS256 token yields its username, groups (deduplicated, sorted), expiry and name."""
    claims = hs.verify(jwt.encode(payload(), SECRET, algorithm="HS256"))
    assert claims == Claims(
        username="alice", groups=("dev", "ops"), expires_at=NOW + 60, name="Alice"
    )


def test_optional_claims_default(hs: TokenVerifier) -> None:
    """Without `groups` and `name` a token has no groups and an empty name."""
    claims = hs.verify(jwt.encode(payload(groups=..., name=...), SECRET, algorithm="HS256"))
    assert (claims.groups, claims.name) == ((), "")


def test_rs256_token(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """An RSA public key verifies RS256 tokens signed by its private half."""
    verifier = TokenVerifier(public_key=public_pem(rsa_key), clock=clock)
    token = jwt.encode(payload(), rsa_key, algorithm="RS256")
    assert verifier.verify(token).username == "alice"


def test_es256_token(ec_key: ec.EllipticCurvePrivateKey, clock: Clock) -> None:
    """An EC P-256 public key verifies ES256 tokens signed by its private half."""
    verifier = TokenVerifier(public_key=public_pem(ec_key), clock=clock)
    token = jwt.encode(payload(), ec_key, algorithm="ES256")
    assert verifier.verify(token).groups == ("dev", "ops")


def test_secret_and_public_key_together(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """With both configured, HS256 tokens use the secret and RS256 tokens the key."""
    verifier = TokenVerifier(secret=SECRET, public_key=public_pem(rsa_key), clock=clock)
    assert verifier.enabled
    assert verifier.verify(jwt.encode(payload(sub="hs"), SECRET, algorithm="HS256")).username == (
        "hs"
    )
    assert verifier.verify(jwt.encode(payload(sub="rs"), rsa_key, algorithm="RS256")).username == (
        "rs"
    )


def test_public_key_from_a_file(rsa_key: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path) -> None:
    """WSFANOUT_JWT_PUBLIC_KEY may name a file holding the PEM."""
    path = tmp_path / "issuer.pem"
    path.write_text(public_pem(rsa_key))
    verifier = TokenVerifier(public_key=str(path), clock=clock)
    assert verifier.verify(jwt.encode(payload(), rsa_key, algorithm="RS256")).username == "alice"


# Time


def test_expired(hs: TokenVerifier) -> None:
    """A token whose `exp` has passed is refused as expired."""
    token = jwt.encode(payload(exp=int(NOW) - 1), SECRET, algorithm="HS256")
    assert "expired" in refused(hs, token)


def test_expiry_uses_the_injected_clock(hs: TokenVerifier, clock: Clock) -> None:
    """`exp` is compared with the verifier's clock: at `exp` exactly the token is expired."""
    token = jwt.encode(payload(exp=int(NOW) + 10), SECRET, algorithm="HS256")
    clock.now = NOW + 9.5
    assert hs.verify(token).username == "alice"
    clock.now = NOW + 10
    assert "expired" in refused(hs, token)


def test_cache_does_not_skip_expiry(hs: TokenVerifier, clock: Clock) -> None:
    """A token verified once (and so cached) is still refused once it expires."""
    token = jwt.encode(payload(), SECRET, algorithm="HS256")
    assert hs.verify(token).username == "alice"
    clock.now = NOW + 61
    assert "expired" in refused(hs, token)


def test_cache_skips_the_signature_check(
    hs: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect with the same token does not decode and verify it again."""
    calls: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    token = jwt.encode(payload(), SECRET, algorithm="HS256")
    assert hs.verify(token) == hs.verify(token)
    assert calls == [token]


def test_leeway(clock: Clock) -> None:
    """`leeway` seconds of skew are forgiven, and no more."""
    verifier = TokenVerifier(secret=SECRET, clock=clock, leeway=30)
    token = jwt.encode(payload(exp=int(NOW) - 20), SECRET, algorithm="HS256")
    assert verifier.verify(token).username == "alice"
    clock.now = NOW + 10
    assert "expired" in refused(verifier, token)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid(hs: TokenVerifier, clock: Clock, claim: str) -> None:
    """A token whose `nbf` (or `iat`) is more than SKEW seconds in the future is refused
    until it is within SKEW; one a little ahead (a backend's clock) is taken."""
    claims = payload(exp=int(NOW) + 600, **{claim: int(NOW) + 100})
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert "not yet valid" in refused(hs, token)
    clock.now = NOW + 100 - SKEW
    assert hs.verify(token).username == "alice"
    ahead = jwt.encode(payload(**{claim: int(NOW) + 5}), SECRET, algorithm="HS256")
    clock.now = NOW
    assert hs.verify(ahead).username == "alice"


@pytest.mark.parametrize("exp", [True, "soon", None, 1e999, float("nan"), 10**400, [1]])
def test_exp_must_be_a_number(hs: TokenVerifier, exp: object) -> None:
    """`exp` must be a finite number of seconds: not a bool, a string, null, inf or NaN."""
    token = hs256_by_hand(
        SECRET.encode(), {"alg": "HS256", "typ": "JWT"}, b64json(payload(exp=exp))
    )
    assert "'exp'" in refused(hs, token)


# Algorithms


def test_alg_none(hs: TokenVerifier) -> None:
    """An unsigned token (`alg: none`) is refused."""
    token = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(payload())}."
    assert refused(hs, token) == "algorithm 'none' not allowed (configured: HS256)"


def test_other_hmac_algorithm(clock: Clock) -> None:
    """HS512, even signed with the right secret, is not an algorithm we accept."""
    secret = "s" * 64  # long enough for HS512, so PyJWT signs without a warning
    verifier = TokenVerifier(secret=secret, clock=clock)
    token = jwt.encode(payload(), secret, algorithm="HS512")
    assert "algorithm 'HS512' not allowed" in refused(verifier, token)


def test_rs256_refused_when_only_a_secret_is_configured(
    hs: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An RS256 token means nothing to a verifier that has no public key."""
    token = jwt.encode(payload(), rsa_key, algorithm="RS256")
    assert "algorithm 'RS256' not allowed" in refused(hs, token)


def test_algorithm_confusion(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """An HS256 token keyed with the public PEM text is refused when only that key is set."""
    pem = public_pem(rsa_key)
    verifier = TokenVerifier(public_key=pem, clock=clock)
    token = hs256_by_hand(pem.encode(), {"alg": "HS256", "typ": "JWT"}, b64json(payload()))
    assert "algorithm 'HS256' not allowed" in refused(verifier, token)


def test_algorithm_confusion_with_a_secret_configured(
    rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """With a secret set too, that token is checked against the secret, and fails."""
    pem = public_pem(rsa_key)
    verifier = TokenVerifier(secret=SECRET, public_key=pem, clock=clock)
    token = hs256_by_hand(pem.encode(), {"alg": "HS256", "typ": "JWT"}, b64json(payload()))
    assert "bad signature" in refused(verifier, token)


def test_header_alg_is_quoted_on_one_line(hs: TokenVerifier) -> None:
    """An `alg` the sender chose cannot break the log line."""
    token = hs256_by_hand(SECRET.encode(), {"alg": "HS256\nforged"}, b64json(payload()))
    assert "'HS256\\nforged' not allowed" in refused(hs, token)


# Signatures


def test_wrong_secret(hs: TokenVerifier) -> None:
    """An HS256 token signed with another secret is refused."""
    token = jwt.encode(payload(), "x" * 32, algorithm="HS256")
    assert "bad signature" in refused(hs, token)


def test_rs256_signed_by_another_key(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """An RS256 token signed by a key other than the configured one is refused."""
    verifier = TokenVerifier(public_key=public_pem(rsa_key), clock=clock)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(payload(), other, algorithm="RS256")
    assert "bad signature" in refused(verifier, token)


def test_es256_signed_by_another_key(ec_key: ec.EllipticCurvePrivateKey, clock: Clock) -> None:
    """An ES256 token signed by a key other than the configured one is refused."""
    verifier = TokenVerifier(public_key=public_pem(ec_key), clock=clock)
    token = jwt.encode(payload(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert "bad signature" in refused(verifier, token)


def test_tampered_payload(hs: TokenVerifier) -> None:
    """Changing the claims of a signed token breaks its signature."""
    header, _, signature = jwt.encode(payload(), SECRET, algorithm="HS256").split(".")
    forged = f"{header}.{b64json(payload(sub='root'))}.{signature}"
    assert "bad signature" in refused(hs, forged)


# Format


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "two.segments",
        "a.b.c.d",
        "!!!.!!!.!!!",
        "é.é.é",
        f"{b64(b'not json')}.{b64json({'sub': 'alice'})}.c2ln",
        f"{b64json(['a', 'list'])}.{b64json({'sub': 'alice'})}.c2ln",
    ],
)
def test_malformed(hs: TokenVerifier, token: str) -> None:
    """Garbage, wrong segment counts, non-base64 or non-JSON headers are malformed."""
    assert refused(hs, token).startswith("malformed")


@pytest.mark.parametrize("body", [b64(b"not json"), b64(b"[1, 2]")])
def test_payload_not_a_json_object(hs: TokenVerifier, body: str) -> None:
    """A correctly signed payload that is not a JSON object is malformed."""
    token = hs256_by_hand(SECRET.encode(), {"alg": "HS256", "typ": "JWT"}, body)
    assert refused(hs, token).startswith("malformed")


def test_too_long_is_refused_before_parsing(hs: TokenVerifier) -> None:
    """A token over the limit is refused as too long, even when correctly signed."""
    token = jwt.encode(payload(pad="x" * MAX_TOKEN_CHARS), SECRET, algorithm="HS256")
    assert "too long" in refused(hs, token)


# Claims


@pytest.mark.parametrize("claim", ["sub", "exp"])
def test_missing_required_claim(hs: TokenVerifier, claim: str) -> None:
    """`sub` and `exp` are required."""
    token = jwt.encode(payload(**{claim: ...}), SECRET, algorithm="HS256")
    assert refused(hs, token) == f"missing claim {claim!r}"


@pytest.mark.parametrize("sub", ["", "-alice", "a" * 65, "al ice", "alice\n", 42])
def test_bad_sub(hs: TokenVerifier, sub: object) -> None:
    """`sub` must be a string that is a valid username."""
    token = jwt.encode(payload(sub=sub), SECRET, algorithm="HS256")
    assert "claim 'sub'" in refused(hs, token)


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ("ops", "must be a list"),
        ({"ops": 1}, "must be a list"),
        (["ops", "bad name"], "invalid group name: 'bad name'"),
        (["ops", 7], "invalid group name: 7"),
        (["a@b"], "invalid group name"),
        (["g"] * 1001, "1001 entries"),
    ],
)
def test_bad_groups(hs: TokenVerifier, groups: object, expected: str) -> None:
    """`groups` must be a list of at most 1000 valid group names."""
    token = jwt.encode(payload(groups=groups), SECRET, algorithm="HS256")
    reason = refused(hs, token)
    assert "claim 'groups'" in reason
    assert expected in reason


def test_thousand_groups_are_fine(hs: TokenVerifier) -> None:
    """Exactly 1000 groups is within the limit."""
    # Names of one or two characters, so that the token stays under the length limit.
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    groups = sorted([*alphabet, *(a + b for a in alphabet for b in alphabet)][:1000])
    token = jwt.encode(payload(groups=groups), SECRET, algorithm="HS256")
    assert hs.verify(token).groups == tuple(groups)


@pytest.mark.parametrize("name", [42, ["Alice"], "Al\nice", "x" * 101])
def test_bad_name(hs: TokenVerifier, name: object) -> None:
    """`name` must be a printable string of at most 100 characters."""
    token = jwt.encode(payload(name=name), SECRET, algorithm="HS256")
    assert "claim 'name'" in refused(hs, token)


def test_audience_claim_is_refused(hs: TokenVerifier) -> None:
    """A token minted for some audience is not for us: none is configured."""
    token = jwt.encode(payload(aud="elsewhere"), SECRET, algorithm="HS256")
    assert "'aud'" in refused(hs, token)


def test_disabled_verifier_refuses_everything(clock: Clock) -> None:
    """With no key configured the verifier is off and every token is refused."""
    verifier = TokenVerifier(clock=clock)
    assert not verifier.enabled
    token = jwt.encode(payload(), SECRET, algorithm="HS256")
    assert "not configured" in refused(verifier, token)


# Keys


@pytest.mark.parametrize("secret", ["short", "s" * 31])
def test_short_secret(secret: str) -> None:
    """An HS256 secret under 32 bytes is refused at start-up."""
    with pytest.raises(ValueError, match="at least 32"):
        TokenVerifier(secret=secret)


def test_pem_as_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    """A PEM key given as the HMAC secret is refused (it is a key, not a secret)."""
    with pytest.raises(ValueError, match="WSFANOUT_JWT_SECRET"):
        TokenVerifier(secret=public_pem(rsa_key))


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_private_key_as_public_key(
    kind: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A private key is refused, with a message asking for the public key."""
    pem = private_pem(rsa_key if kind == "rsa" else ec_key)
    with pytest.raises(ValueError, match="private key; give the public key"):
        TokenVerifier(public_key=pem)


def test_private_key_file_as_public_key(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    """A file holding a private key is refused too."""
    path = tmp_path / "private.pem"
    path.write_text(private_pem(rsa_key))
    with pytest.raises(ValueError, match="private key"):
        TokenVerifier(public_key=str(path))


def test_missing_key_file(tmp_path: Path) -> None:
    """A public key path that cannot be read is refused at start-up."""
    with pytest.raises(ValueError, match="neither PEM text nor a readable file"):
        TokenVerifier(public_key=str(tmp_path / "nowhere.pem"))


def test_not_a_pem(tmp_path: Path) -> None:
    """A file that is not a PEM public key is refused."""
    path = tmp_path / "junk.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(public_key=str(path))


def test_unsupported_keys() -> None:
    """Keys we have no algorithm for are refused: EC off P-256, Ed25519, small RSA."""
    with pytest.raises(ValueError, match="P-256"):
        TokenVerifier(public_key=public_pem(ec.generate_private_key(ec.SECP384R1())))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refusing it is the point)
    with pytest.raises(ValueError, match="1024 bits"):
        TokenVerifier(public_key=public_pem(small))
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = ed.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(ValueError, match="not supported"):
        TokenVerifier(public_key=pem)

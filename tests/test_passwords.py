"""passwords: scrypt hashes, self-describing, constant-time verification."""

from __future__ import annotations

import pytest

from wsfanout.passwords import dummy_hash, hash_password, verify_password


def test_hash_and_verify() -> None:
    """The right password verifies; a wrong one does not; salts differ."""
    stored = hash_password("Greg")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password("Greg", stored)
    assert not verify_password("greg", stored)
    assert hash_password("Greg") != stored


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain",
        "md5$1$2$3$abc$def",
        "scrypt$x$8$1$abc$def",
        "scrypt$16384$8$1$%%%$abc",
        "scrypt$99999999999$8$1$YWJjZGVmZ2hpamtsbW5vcA$YWJjZGVmZ2hpamtsbW5vcA",
    ],
)
def test_malformed_hashes_never_verify(stored: str) -> None:
    """A malformed or absurd stored hash is a failed login, not an exception."""
    assert not verify_password("anything", stored)


def test_dummy_hash_is_cached_and_never_matches_guessable_input() -> None:
    """The hash used for unknown users is computed once and rejects empty input."""
    assert dummy_hash() is dummy_hash()
    assert not verify_password("", dummy_hash())

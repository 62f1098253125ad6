"""sessions: issue and verify cookie tokens; key rotation; generated keys."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from wsfanout.service import secret_keys
from wsfanout.sessions import SessionCodec


def test_round_trip() -> None:
    """A token issued for a user verifies back to that user and its issue time."""
    codec = SessionCodec(("k1",), max_age=60)
    session = codec.verify(codec.issue(7, "greg", "s7", now=1000), now=1010)
    assert session is not None
    assert (session.user_id, session.username, session.issued_at) == (7, "greg", 1000)


@pytest.mark.parametrize("token", [None, "", "garbage", "gAAAAA" + "x" * 80, "é" * 10, "a" * 5000])
def test_garbage_is_anonymous(token: str | None) -> None:
    """Missing, malformed or oversized tokens verify to None, never raise."""
    assert SessionCodec(("k1",), max_age=60).verify(token) is None


def test_tampered_token_is_rejected() -> None:
    """Changing one character of a token invalidates it."""
    codec = SessionCodec(("k1",), max_age=60)
    token = codec.issue(1, "greg", "s1")
    middle = len(token) // 2
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    assert codec.verify(tampered) is None


def test_expiry_and_future_tokens() -> None:
    """A token older than max age, or stamped in the future, is rejected."""
    codec = SessionCodec(("k1",), max_age=60)
    token = codec.issue(1, "greg", "s1", now=1000)
    assert codec.verify(token, now=1059) is not None
    assert codec.verify(token, now=1061) is None
    assert codec.verify(codec.issue(1, "greg", "s1", now=5000), now=1000) is None


def test_rotation_and_foreign_keys() -> None:
    """The first key signs, every key verifies; a token from another key is rejected."""
    old = SessionCodec(("old",), max_age=60)
    rotated = SessionCodec(("new", "old"), max_age=60)
    token = old.issue(1, "greg", "s1")
    assert rotated.verify(token) is not None
    assert old.verify(rotated.issue(1, "greg", "s1")) is None
    assert SessionCodec(("other",), max_age=60).verify(token) is None


def test_generated_key_is_made_once(tmp_path: Path) -> None:
    """Without a configured key, one is generated into the data dir and reused."""
    first = secret_keys((), tmp_path / "data")
    assert secret_keys((), tmp_path / "data") == first
    assert (tmp_path / "data" / "secret_key").stat().st_mode & 0o777 == 0o600
    assert secret_keys(("configured",), tmp_path / "data") == ("configured",)


def test_generated_key_race(tmp_path: Path) -> None:
    """Workers starting together all end up with the same key."""
    results: list[tuple[str, ...]] = []
    threads = [
        threading.Thread(target=lambda: results.append(secret_keys((), tmp_path))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1

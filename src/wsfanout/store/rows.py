"""What the store answers (``User``) and what it refuses (the ``StoreError`` family)."""

from __future__ import annotations

from dataclasses import dataclass


class StoreError(Exception):
    """A change the store refuses; the message is fit to show a user."""


class DuplicateError(StoreError):
    def __init__(self, what: str, name: str) -> None:
        super().__init__(f"a {what} named {name!r} already exists")


class UnknownGroupError(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no group named {name!r}")
        self.name = name


class UnknownUserError(StoreError):
    def __init__(self, name: str, matches: int = 0) -> None:
        if matches > 1:
            detail = f"{name!r} is the first name of {matches} users: use a username"
        else:
            detail = f"no user named {name!r}"
        super().__init__(detail)
        self.name = name


class InvalidNameError(StoreError):
    def __init__(self, what: str, name: str, rule: str) -> None:
        super().__init__(f"invalid {what} {name!r}: {rule}")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    first_name: str
    password_hash: str

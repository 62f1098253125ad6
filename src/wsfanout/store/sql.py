"""The SQL both backends speak, and the name folding that makes them answer alike."""

from __future__ import annotations

import string
from typing import Final

USER_COLUMNS: Final = "SELECT id, username, first_name, password_hash FROM users"
USER_BY_NAME: Final = USER_COLUMNS + " WHERE lower(username) = ?"  # ? folded: fold
USER_BY_ID: Final = USER_COLUMNS + " WHERE id = ?"
IDENTITY: Final = (  # a user's row once per group (once with NULL when in none), by group
    "SELECT u.id, u.username, u.first_name, u.password_hash, g.name FROM users u "
    "LEFT JOIN user_groups ug ON ug.user_id = u.id LEFT JOIN groups g ON g.id = ug.group_id "
    "WHERE u.id = ? ORDER BY g.name"
)

# Groups with their member counts; ``where`` narrows them (placeholders only).
GROUP_SIZES: Final = (
    "SELECT g.name, count(ug.user_id) FROM groups g "
    "LEFT JOIN user_groups ug ON ug.group_id = g.id{where} GROUP BY g.id, g.name ORDER BY g.name"
)
# Users whose username or first name starts with a prefix (LIKE patterns: ``like_prefix``);
# ``among`` narrows them to the members of some groups (placeholders only).
USERS_LIKE: Final = (
    "SELECT username, first_name FROM users u WHERE {among}(lower(username) LIKE ? ESCAPE '\\' "
    "OR lower(first_name) LIKE ? ESCAPE '\\') ORDER BY lower(username) LIMIT ?"
)
MEMBERS_OF: Final = (
    "EXISTS (SELECT 1 FROM user_groups ug JOIN groups g ON g.id = ug.group_id "
    "WHERE ug.user_id = u.id AND g.name IN ({marks})) AND "
)
# Names compare case-insensitively in ASCII only, as SQLite's lower() does, so that both
# backends answer alike: lower(column) = ? with the value folded here.
_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def marks(values: list[str]) -> str:
    """As many ``?`` placeholders, comma-separated, as there are values."""
    return ",".join("?" * len(values))


def fold(name: str) -> str:
    """``name`` as ``lower()`` makes a stored name on both backends (ASCII letters only)."""
    return name.translate(_ASCII_LOWER)


def like_prefix(prefix: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for folded names starting with ``prefix``."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return fold(escaped) + "%"

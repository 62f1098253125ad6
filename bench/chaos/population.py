"""Who takes part in a chaos run, made from its seed: users, groups and memberships, the
reading clients (each with a home node) and the publishers; and the tokens they connect
with (connection tokens: no password logins for a thousand clients)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import jwt

NODES = 3
GROUPS = 8
JWT_SECRET = "chaos-jwt-secret-of-at-least-32-bytes!"  # noqa: S105 - a throwaway run's own
API_KEY = "chaos-api-key"


@dataclass
class Population:
    users: dict[str, list[str]]  # username -> groups
    clients: list[tuple[str, int]]  # client index -> (username, home node)
    publishers: list[str] = field(default_factory=lambda: [f"pub{i}" for i in range(NODES)])

    @property
    def groups(self) -> list[str]:
        return [f"g{i}" for i in range(GROUPS)]

    def readers(self, stream: str) -> list[int]:
        """The client indexes meant to receive a stream's messages."""
        if stream == "all":
            return list(range(len(self.clients)))
        kind, _, name = stream.partition(":")
        if kind == "group":
            return [i for i, (user, _) in enumerate(self.clients) if name in self.users[user]]
        return [i for i, (user, _) in enumerate(self.clients) if user == name]

    def to_json(self) -> dict[str, Any]:
        return {"users": self.users, "clients": self.clients}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Population:
        return cls(data["users"], [(user, home) for user, home in data["clients"]])


def make(seed: int, clients: int) -> Population:
    rng = random.Random(f"{seed}-population")
    count = max(3, clients // 5)
    users = {}
    for i in range(count):
        users[f"u{i:04d}"] = sorted(rng.sample([f"g{g}" for g in range(GROUPS)], rng.randint(1, 2)))
    names = list(users)
    return Population(users, [(names[i % count], i % NODES) for i in range(clients)])


def token(username: str, groups: list[str]) -> str:
    claims = {"sub": username, "groups": groups, "exp": int(time.time()) + 6 * 3600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")

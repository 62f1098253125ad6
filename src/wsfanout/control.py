"""Control (DESIGN 5.3): an operator's revocations and membership changes, carried out on
this node's caches and open connections and told to every other node.

``make()`` carries a change out here (``apply()``) and tells it through the backplane;
the backplane hands the other nodes' changes to ``apply()``. A membership change is not
applied as told: the user's connections take the groups the store has for them then (two
changes made at once on two nodes arrive in different orders, but the store has one answer).

The last minute of changes is remembered, so that a handshake under way when one was made
(its login checked, its connection not yet in the hub) does not slip past it: the
connection asks ``changed_since()`` once it has joined, and closes if it was changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from .admission import Login
from .backplane import BackplaneUnavailableError
from .hub import Hub, UnavailableError
from .outage import OutageLog
from .protocol import CloseCode
from .store import DatabaseError, Store

log = logging.getLogger(__name__)

CHANGES_MEMORY: Final = 60.0  # seconds a change is remembered, for handshakes under way
CHANGES_MAX: Final = 10_000  # past this many, forgotten ones are dropped at each change
REVOKED: Final = "the session was revoked: log in again"


class Control:
    """The operator's changes, on this node and through the backplane on the others."""

    def __init__(self, store: Store, hub: Hub, outages: OutageLog) -> None:
        self.store = store
        self.hub = hub
        self.outages = outages
        # The operator's changes of the last CHANGES_MEMORY seconds, for handshakes under way
        # (``changed_since``): "s:<session>" and "u:<user>" revoked, "m:<user>" regrouped,
        # "g:<group>" deleted -> when (time.monotonic()).
        self.changes: dict[str, float] = {}
        self._regrouping: dict[str, bool] = {}  # user -> read again
        self._tasks: set[asyncio.Task[None]] = set()

    async def make(self, change: dict[str, Any]) -> None:
        """Carry out an operator's change (``apply``) here, and tell every other node.

        Raises:
            UnavailableError: the other nodes could not be told (Redis is away): it holds
            here, and their caches catch up within a few seconds, but their open
            connections were not changed.
        """
        self.apply(change)
        try:
            await self.hub.backplane.control(change)
        except BackplaneUnavailableError as exc:
            raise UnavailableError(str(exc)) from None

    def apply(self, change: dict[str, Any]) -> None:
        """An operator's change, made here or on another node, reaching this node's
        caches and open connections. ``change["op"]`` is one of:

        - ``revoke`` (``user``, ``session`` or None for all of theirs): close them with 1008;
        - ``member`` (``user``): their groups changed: their connections here take the
          groups the store now has for them (not the change itself: two changes made at
          once on two nodes arrive in different orders, but the store has one answer);
        - ``group_deleted`` (``group``): its members here leave it.

        Every change but a logout also drops the cached answers about users and groups.
        """
        op = change.get("op")
        session = change.get("session")
        if op != "revoke" or session is None:  # a logout changes no user or group
            self.store.forget()
        if op == "revoke":
            user = str(change["user"])
            self.store.forget_sessions(session)
            self._remember(f"s:{session}" if session else "u:" + user.lower())
            closed = self.hub.disconnect(user, session, REVOKED)
            if closed:
                log.info("closed %d connections of %s: session revoked", closed, user)
        elif op == "member":
            user = str(change["user"])
            self._remember("m:" + user.lower())
            self._regroup(user)
        elif op == "group_deleted":
            self._remember("g:" + str(change["group"]))
            self.hub.drop_group(str(change["group"]))

    def missed(self) -> None:
        """Back on Redis after losing it: changes other nodes made meanwhile never reached
        this one, so nothing cached about users, groups or sessions is trusted (the hub
        closes the connections with 1012, and they come back through the handshake)."""
        self.store.forget()
        self.store.forget_sessions()

    def changed_since(self, login: Login, since: float) -> int | None:
        """How a connection whose login was checked at ``since`` (``time.monotonic()``)
        must close, if the operator changed it meanwhile: 1008 (its session, or all of its
        user's, revoked), 1012 (its user's groups changed: reconnect); None: unchanged."""
        changes = self.changes
        if not changes:
            return None
        user = login.username.lower()
        if any(changes.get(key, since) > since for key in (f"s:{login.session_id}", "u:" + user)):
            return CloseCode.POLICY
        regrouped = ("m:" + user, *("g:" + group for group in login.groups))
        if login.session_id is not None and any(  # a token's groups are its issuer's
            changes.get(key, since) > since for key in regrouped
        ):
            return CloseCode.SERVICE_RESTART
        return None

    def _remember(self, key: str) -> None:
        now = time.monotonic()
        changes = self.changes
        if len(changes) > CHANGES_MAX or next(iter(changes.values()), now) < now - CHANGES_MEMORY:
            for old, when in list(changes.items()):
                if when < now - CHANGES_MEMORY:
                    del changes[old]
        changes.pop(key, None)  # re-added last: the dict stays in time order
        changes[key] = now

    async def close(self) -> None:
        """Stop the regroup reads under way (the service is closing: their answers would
        reach no connection, and the store is about to close)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _regroup(self, user: str) -> None:
        """Bring this user's connections here to the store's groups for them, in a task;
        a change told meanwhile makes it read again, so the last read is the newest."""
        key = user.lower()
        if key in self._regrouping:
            self._regrouping[key] = True  # read again when the read under way is done
            return
        self._regrouping[key] = False
        task = asyncio.get_running_loop().create_task(self._read_groups(user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_groups(self, user: str) -> None:
        key = user.lower()
        try:
            while True:
                self._regrouping[key] = False
                found = await self.store.user_by_name(user)
                groups = await self.store.groups_of(found.id) if found is not None else None
                if not self._regrouping[key]:
                    break
        except DatabaseError as exc:
            self.outages.failed(f"could not read the groups of {user}", exc)
            return
        finally:
            self._regrouping.pop(key, None)
        if groups is not None:
            self.hub.set_groups(user, groups)

"""Publishing: a message's target resolved, a backend's batch validated, then handed to
the hub's one door.

``publish()`` serves a websocket's frames: it resolves the target (the local index first,
then the store) and publishes. A backend's body (``POST /api/publish``, RabbitMQ, the host
app) goes through ``validate_batch()`` (every item read by ``parse_item``, checked and
resolved, or a ``BatchError`` naming the first bad one: nothing is published then) and
``publish_batch()`` (paced, all or nothing as far as the hub can say beforehand). The host
app's code does both through ``publish_items()``, which raises the public ``PublishError``
family instead.

Both go through ``check()``, the one place where a message's size is checked, whichever
door it came in by: its text as it will go out (JSON-escaped UTF-8, ``protocol.check_size``)
within ``WSFANOUT_MAX_FRAME_BYTES``. A websocket frame within that limit always passes (its
text is in it, written at least as long), so users never meet this check; backends do.

A backend's message may carry an ``idempotency_key``: one already published to the same
stream within ``WSFANOUT_IDEMPOTENCY_TTL`` is taken (the caller hears it was) but not
published again. The engine keeps the keys (``Backplane.publish``): in Redis, atomically
with the publish, for every node; in memory on one node.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Final

from . import protocol
from .config import Settings
from .hub import Hub, UnavailableError
from .outage import OutageLog
from .protocol import (
    GROUP_RE,
    MAX_KEY_CHARS,
    MAX_SENDER_CHARS,
    USERNAME_RE,
    ErrorCode,
    Kind,
    ProtocolError,
    Publish,
    Source,
)
from .store import DatabaseError, Store
from .store import UnknownUserError as NoSuchUserError

MAX_BATCH: Final = 1000  # messages in one backend publish


class PublishError(Exception):
    """The host app's publish (``App.publish``) was refused, and nothing of it published.

    ``code`` is the HTTP API's error code (``bad_message``, ``unknown_group``, …),
    ``index`` the refused item of a list (0 for one item or the whole batch), ``detail``
    what is wrong. Each refusal has its own subclass.
    """

    def __init__(self, code: str, detail: str, index: int = 0) -> None:
        super().__init__(f"{code}: {detail}" + (f" (item {index})" if index else ""))
        self.code = code
        self.detail = detail
        self.index = index


class UnknownGroupError(PublishError):
    """No such group: not in the store (and, with tokens or ``authenticate``, a name no
    group can have)."""


class UnknownUserError(PublishError):
    """No such user: not in the store (and, with tokens or ``authenticate``, a name no
    user can have)."""


class MessageTooLargeError(PublishError):
    """A message over ``WSFANOUT_MAX_FRAME_BYTES`` on the wire, or over 1,000 in a list."""


class ServiceUnavailableError(PublishError):
    """The service cannot take it now (Redis or the database away, shutting down): try
    again."""


REFUSALS: Final[dict[ErrorCode, type[PublishError]]] = {
    ErrorCode.UNKNOWN_GROUP: UnknownGroupError,
    ErrorCode.UNKNOWN_USER: UnknownUserError,
    ErrorCode.TOO_LARGE: MessageTooLargeError,
    ErrorCode.UNAVAILABLE: ServiceUnavailableError,
}


class BatchError(Exception):
    """One item of a backend's batch is bad; ``index`` says which."""

    def __init__(self, index: int, code: ErrorCode, detail: str) -> None:
        super().__init__(f"item {index}: {code}: {detail}")
        self.index = index
        self.code = code
        self.detail = detail


class Publishing:
    """Every source's way to the hub: websockets, the HTTP API, RabbitMQ, the host app."""

    def __init__(
        self, settings: Settings, store: Store, hub: Hub, outages: OutageLog, *, outside: bool
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.outages = outages
        # Users and groups may come from outside the store: connection tokens, or the
        # host app's ``authenticate``.
        self.outside = outside

    async def check(self, publish: Publish) -> Publish:
        """What every message must pass, whichever door it came in by: its size on the
        wire, then its target (``resolve``).

        Raises:
            ProtocolError: ``too_large``, or as ``resolve``.
        """
        protocol.check_size(publish, self.settings.max_frame_bytes)
        return await self.resolve(publish)

    async def resolve(self, publish: Publish) -> Publish:
        """The publish with its target resolved: a group that exists, an exact username.
        With connection tokens on (or the host app's ``authenticate``), groups and users
        need no row in the store: a group or a username someone is online in (or as), on
        any node, is taken as given (before first names, as a username always is). Names
        nobody holds are refused, so that no one can fill Redis with the history of
        streams nobody listens to; but the host app's own code (``Source.APP``) names its
        users and groups with authority: any well-formed name is taken, online or not, so
        that a user between two connections gets the message on resume.

        Raises:
            ProtocolError: unknown group or user, or the database failing.
        """
        store, hub = self.store, self.hub
        target = publish.target
        try:
            # Who is connected here answers most lookups without the database.
            outside = self.outside
            trusted = outside and publish.source is Source.APP
            if publish.kind is Kind.GROUP:
                if (
                    not hub.has_group(target)
                    and not await store.group_exists(target)
                    and not (
                        outside
                        and GROUP_RE.fullmatch(target)
                        and (trusted or await hub.present(Kind.GROUP, target))
                    )
                ):
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_GROUP, f"no group named {target!r}", publish.frame_id
                    )
                return publish
            if publish.kind is Kind.DIRECT:
                name = hub.local_username(target)
                if (
                    name is None
                    and outside
                    and USERNAME_RE.fullmatch(target)
                    and await hub.present(Kind.DIRECT, target)
                ):
                    name = target  # a token user, online on another node
                if name is None:
                    try:
                        name = await store.resolve_user(target)
                    except NoSuchUserError:
                        if not (trusted and USERNAME_RE.fullmatch(target)):
                            raise
                        name = target  # the host's own code names one of its users
                target = name
        except NoSuchUserError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, str(exc), publish.frame_id) from None
        except DatabaseError as exc:
            self.outages.failed("a message could not be resolved", exc)
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "the database is unavailable, try again", publish.frame_id
            ) from None
        return publish if target == publish.target else dataclasses.replace(publish, target=target)

    async def publish(self, publish: Publish) -> asyncio.Future[None] | None:
        """Check the message (its size, its target), then hand it to the hub's door.

        Returns:
            What ``Hub.publish`` returns: None once delivered here, or a future that
            settles when the backplane has it.

        Raises:
            ProtocolError: too large, unknown group or user, or the service cannot take it now.
        """
        resolved = await self.check(publish)
        try:
            return self.hub.publish(resolved)
        except UnavailableError as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), publish.frame_id) from None

    async def validate_batch(
        self, data: Any, source: Source, key: str | None = None
    ) -> list[Publish]:
        """A backend's publish body (one object or an array), each item checked and resolved.

        Args:
            key: the whole body's idempotency key (RabbitMQ's ``message_id``), for items
                without one of their own: a single object's own, ``<key>#<index>`` for an
                array's items (from 0), so that each is published once.

        Raises:
            BatchError: the first bad item, with its index; nothing is published then.
        """
        items = data if isinstance(data, list) else [data]
        if not 1 <= len(items) <= MAX_BATCH:
            raise BatchError(
                0,
                ErrorCode.TOO_LARGE if items else ErrorCode.BAD_MESSAGE,
                f"send 1 to {MAX_BATCH} messages at a time, not {len(items)}",
            )
        checked = []
        for index, raw in enumerate(items):
            try:
                given = key if key is None or data is raw else f"{key}#{index}"
                publish = parse_item(raw, source, given)
                checked.append(await self.check(publish))
            except ProtocolError as exc:
                raise BatchError(index, exc.code, exc.detail) from None
        return checked

    async def publish_batch(self, batch: list[Publish]) -> None:
        """Publish validated messages in order, paced (pacing.py): return once every one is
        handed over, to the local outboxes or (with a backplane) to Redis.

        When the hub cannot take the whole batch now, none of it is published. Once
        started, a shutdown or a Redis failure can still stop part of it: the caller
        hears UnavailableError and may send it again (at least once, as with RabbitMQ).
        A batch keeps its order; batches sent at once are paced side by side, none behind
        another (a source whose batches have an order, RabbitMQ's queue, sends one at a
        time), and each stream still goes out in offset order.

        Raises:
            UnavailableError: not all were published.
        """
        hub = self.hub
        hub.make_room(len(batch))
        pending = []
        # With Redis nothing here suspends (every node paces what it receives), so nothing
        # can take the room meanwhile; the local engine hands back a wait only when it must
        # wait for room in the outboxes, and the next publish waits behind it (order).
        for publish in batch:
            sent = hub.publish_paced(publish)
            if sent is None:
                continue
            if isinstance(sent, asyncio.Future):
                pending.append(sent)
            else:
                await sent
        if pending:
            results = await asyncio.gather(*pending, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def publish_items(self, data: Any, source: Source) -> int:
        """Validate and publish a backend's items as ``POST /api/publish`` does: how many.

        Raises:
            PublishError: a subclass for each refusal; nothing of a refused batch is
            published (a shutdown or a Redis failure midway aside: ServiceUnavailableError).
        """
        try:
            batch = await self.validate_batch(
                list(data) if isinstance(data, tuple) else data, source
            )
        except BatchError as exc:
            raise REFUSALS.get(exc.code, PublishError)(
                exc.code.value, exc.detail, exc.index
            ) from None
        try:
            await self.publish_batch(batch)
        except UnavailableError as exc:
            raise ServiceUnavailableError(ErrorCode.UNAVAILABLE.value, str(exc)) from None
        return len(batch)


def parse_item(data: Any, source: Source, key: str | None = None) -> Publish:
    """Validate one publish from a backend (the HTTP API, RabbitMQ, the host app): a
    publish object with an optional ``from`` (default ``system``) and an optional
    ``idempotency_key`` (else ``key``, if any). Its size is checked apart, as every
    door's is (``protocol.check_size``).

    Raises:
        ProtocolError: as ``protocol.parse_object``, or a bad ``from`` or key.
    """
    publish = protocol.parse_object(data)
    sender = data.get("from", "system")
    if not isinstance(sender, str) or not sender.strip() or len(sender) > MAX_SENDER_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"'from' must be a name of 1 to {MAX_SENDER_CHARS} characters",
            publish.frame_id,
        )
    own = data.get("idempotency_key")
    if own is not None:
        if not isinstance(own, str) or not 0 < len(own) <= MAX_KEY_CHARS:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"'idempotency_key' must be a string of 1 to {MAX_KEY_CHARS} characters",
                publish.frame_id,
            )
        key = own
    return dataclasses.replace(publish, sender=sender.strip(), source=source, key=key)

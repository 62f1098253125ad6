"""Settings: every knob, its default, and its ``WSFANOUT_*`` environment variable."""

from __future__ import annotations

import difflib
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

BYTES = 1
KIB = 1024 * BYTES
MIB = 1024 * KIB
SECONDS = 1.0
DAYS = 86400 * SECONDS
WEBHOOK_SECRET_MIN = 16  # characters
IDEMPOTENCY_TTL_MIN = 0.01 * SECONDS  # Redis keeps a key whole milliseconds
PREFIX = "WSFANOUT_"
# Variables read outside Settings: the command line's (URL, API_KEY: the key the admin
# commands send; SERVER), the Justfile's (BIND), the docs' JavaScript example's (TOKEN).
ELSEWHERE = frozenset({"URL", "API_KEY", "SERVER", "BIND", "TOKEN"})
# Read by the JavaScript client's tests only: never suggested, never warned about.
TESTS_ONLY = frozenset({"URL_SINGLE", "URL_REDIS", "CONTROL"})


class ConfigError(ValueError):
    """A ``WSFANOUT_*`` variable holds a value that cannot be used."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"{name}={value!r}: expected {expected}")


def redact(url: str) -> str:
    """The URL with its password (``user:password@`` or ``?password=``) as ``***``, fit
    for logs and messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url.partition("://")[0] + "://***"  # unparsable: show none of it
    if password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    if "password=" in parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        shown = [(k, "***" if k == "password" else v) for k, v in pairs]
        parts = parts._replace(query=urllib.parse.urlencode(shown, safe="*/"))
    return urllib.parse.urlunsplit(parts)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be told, with safe defaults.

    Build one with ``Settings.from_env()`` or directly with keywords; pass it to
    ``create_app()``. It is frozen: change it with ``dataclasses.replace``.
    """

    # Storage
    data_dir: Path = Path("data")
    database: Path | None = None  # None: data_dir / "wsfanout.sqlite3"
    database_url: str = field(default="", repr=False)  # postgresql://…: instead of SQLite
    database_pool_size: int = 10  # PostgreSQL connections per process, at most

    # Sessions and login
    secret_keys: tuple[str, ...] = ()  # empty: generated once into data_dir
    session_max_age: float = 14 * DAYS
    cookie_secure: bool = False
    allowed_origins: frozenset[str] = frozenset()
    login_max_failures: int = 5
    login_failure_window: float = 15 * 60 * SECONDS
    min_password_length: int = 8  # characters, for passwords set through the API or CLI

    # Limits
    max_frame_bytes: int = 64 * KIB
    outbox_bytes: int = 1 * MIB
    # A burst's 200 events in one frame (each frame is a write, and a write through the
    # kernel's loopback path cost uvicorn half its CPU per delivery at 64: issue 29)
    batch_max: int = 256
    batch_bytes: int = 64 * KIB  # also what a client that stops reading holds in flight (x3)
    max_connections: int = 50_000
    max_connections_per_user: int = 100  # one user's open websockets (tabs, devices)
    rate_limit: float = 50.0  # inbound messages per second per connection; 0 disables
    rate_burst: int = 100
    close_timeout: float = 5 * SECONDS  # how long a close may wait on a client that does not read
    pace_timeout: float = 0.5 * SECONDS  # how long one user may hold backends up (pacing.py)
    send_timeout: float = 30 * SECONDS  # a send blocked this long: the client does not read

    # TCP connections, before any request (servers/peers.py): per address, per process
    head_timeout: float = 5 * SECONDS  # a new connection's time to send a whole request head
    max_waiting_per_address: int = 256  # one address's connections waiting for a head; 0: any
    max_connections_per_address: int = 0  # one address's connections in all; 0: any

    # Positions, history and presence (DESIGN 5.1, 5.2)
    history_size: int = 100  # messages kept per stream for resume; 0: no history, no offsets
    history_ttl: float = 300 * SECONDS  # and for how long; 0: no history
    history_bytes: int = 64 * MIB  # all streams' history in memory together (one node)
    presence_events_max: int = 100  # largest group told of its members' online / offline

    # Websocket extensions
    compression: bool = False  # accept permessage-deflate when a client offers it (DESIGN 10)

    # Sources (the publish API, RabbitMQ) and the Redis backplane
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    redis_url: str = ""
    redis_prefix: str = "wsfanout:"
    amqp_url: str = field(default="", repr=False)
    amqp_queue: str = "wsfanout"
    amqp_prefetch: int = 100
    idempotency_ttl: float = 300 * SECONDS  # a publish's idempotency_key is kept this long

    # Control (DESIGN 5.3, 6)
    jwt_secret: str = field(default="", repr=False)  # HS256 connection tokens
    jwt_public_key: str = ""  # RS256 / ES256: the PEM text, or a file holding it
    group_write: str = "any"  # who may send to a group: "any" user, or its "members" only

    # Embedding (DESIGN 12)
    pages: bool = True  # serve the page, /login and /logout (off: the host app logs users in)
    webhook_url: str = ""  # where lifecycle events are posted; empty: no webhooks
    webhook_secret: str = field(default="", repr=False)  # signs them (X-Wsfanout-Signature)
    webhook_queue: int = 10_000  # events waiting to be posted, at most; past it they are dropped

    log_level: str = "info"
    # The garbage collector (collector.py): "auto" (tuned where wsfanout owns the process),
    # "tuned" (always, a host's process too), "untouched" (never)
    gc: str = "auto"

    @property
    def history_on(self) -> bool:
        """Whether messages get offsets and are kept for resume."""
        return self.history_size > 0 and self.history_ttl > 0

    @property
    def database_path(self) -> Path:
        """The SQLite file: ``database`` if set, else inside ``data_dir``."""
        return self.database if self.database is not None else self.data_dir / "wsfanout.sqlite3"

    @property
    def database_target(self) -> Path | str:
        """Where the store lives: the PostgreSQL URL if set, else the SQLite file."""
        return self.database_url or self.database_path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``WSFANOUT_*`` variable; unset or empty ones keep their default.

        Raises:
            ConfigError: a variable is set to something unusable, naming it and the value.
        """
        env = os.environ if environ is None else environ
        return cls._read(_EnvReader(env))

    @classmethod
    def _read(cls, reader: _EnvReader) -> Settings:
        defaults = cls()
        data_dir = Path(reader.text("DATA_DIR", str(defaults.data_dir)))
        database = reader.text("DATABASE", "")
        webhook_url = reader.url("WEBHOOK_URL", ("http", "https"))
        parts = urllib.parse.urlsplit(webhook_url)
        if webhook_url and (not parts.hostname or parts.username or parts.password):
            raise ConfigError(
                "WSFANOUT_WEBHOOK_URL",
                redact(webhook_url),
                "http:// or https:// with a host, and no user or password (the secret signs)",
            )
        webhook_secret = reader.text("WEBHOOK_SECRET", "")
        if webhook_url and len(webhook_secret) < WEBHOOK_SECRET_MIN:
            raise ConfigError(
                "WSFANOUT_WEBHOOK_SECRET",
                "***" if webhook_secret else "",
                f"a secret of at least {WEBHOOK_SECRET_MIN} characters to sign the webhooks "
                "with, since WSFANOUT_WEBHOOK_URL is set (receivers could not tell wsfanout's "
                "posts from anyone's)",
            )
        return cls(
            data_dir=data_dir,
            database=Path(database) if database else None,
            database_url=reader.url("DATABASE_URL", ("postgresql", "postgres")),
            database_pool_size=reader.integer("DATABASE_POOL_SIZE", defaults.database_pool_size),
            secret_keys=reader.items("SECRET_KEY"),
            session_max_age=reader.number("SESSION_MAX_AGE", defaults.session_max_age, low=1),
            cookie_secure=reader.flag("COOKIE_SECURE", defaults.cookie_secure),
            allowed_origins=reader.origins("ALLOWED_ORIGINS"),
            login_max_failures=reader.integer("LOGIN_MAX_FAILURES", defaults.login_max_failures),
            min_password_length=reader.integer("MIN_PASSWORD_LENGTH", defaults.min_password_length),
            login_failure_window=reader.number(
                "LOGIN_FAILURE_WINDOW", defaults.login_failure_window, low=1
            ),
            max_frame_bytes=reader.integer("MAX_FRAME_BYTES", defaults.max_frame_bytes, low=256),
            outbox_bytes=reader.integer("OUTBOX_BYTES", defaults.outbox_bytes, low=1024),
            batch_max=reader.integer("BATCH_MAX", defaults.batch_max),
            batch_bytes=reader.integer("BATCH_BYTES", defaults.batch_bytes, low=1024),
            max_connections=reader.integer("MAX_CONNECTIONS", defaults.max_connections),
            max_connections_per_user=reader.integer(
                "MAX_CONNECTIONS_PER_USER", defaults.max_connections_per_user
            ),
            rate_limit=reader.number("RATE_LIMIT", defaults.rate_limit, low=0),
            rate_burst=reader.integer("RATE_BURST", defaults.rate_burst),
            close_timeout=reader.number("CLOSE_TIMEOUT", defaults.close_timeout, low=0.1),
            pace_timeout=reader.number("PACE_TIMEOUT", defaults.pace_timeout, low=0.1),
            send_timeout=reader.number("SEND_TIMEOUT", defaults.send_timeout, low=0.1),
            head_timeout=reader.number("HEAD_TIMEOUT", defaults.head_timeout, low=0.1),
            max_waiting_per_address=reader.integer(
                "MAX_WAITING_PER_ADDRESS", defaults.max_waiting_per_address, low=0
            ),
            max_connections_per_address=reader.integer(
                "MAX_CONNECTIONS_PER_ADDRESS", defaults.max_connections_per_address, low=0
            ),
            history_size=reader.integer("HISTORY_SIZE", defaults.history_size, low=0),
            history_ttl=reader.number("HISTORY_TTL", defaults.history_ttl, low=0),
            history_bytes=reader.integer("HISTORY_BYTES", defaults.history_bytes, low=0),
            presence_events_max=reader.integer(
                "PRESENCE_EVENTS_MAX", defaults.presence_events_max, low=0
            ),
            compression=reader.flag("COMPRESSION", defaults.compression),
            api_keys=reader.items("API_KEYS"),
            redis_url=reader.url("REDIS_URL", ("redis", "rediss", "unix")),
            redis_prefix=reader.text("REDIS_PREFIX", defaults.redis_prefix),
            amqp_url=reader.url("AMQP_URL", ("amqp", "amqps")),
            amqp_queue=reader.text("AMQP_QUEUE", defaults.amqp_queue),
            amqp_prefetch=reader.integer("AMQP_PREFETCH", defaults.amqp_prefetch),
            idempotency_ttl=reader.number(
                "IDEMPOTENCY_TTL", defaults.idempotency_ttl, low=IDEMPOTENCY_TTL_MIN
            ),
            jwt_secret=reader.text("JWT_SECRET", ""),
            jwt_public_key=reader.text("JWT_PUBLIC_KEY", ""),
            group_write=reader.choice("GROUP_WRITE", defaults.group_write, ("any", "members")),
            pages=reader.flag("PAGES", defaults.pages),
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            webhook_queue=reader.integer("WEBHOOK_QUEUE", defaults.webhook_queue),
            gc=reader.choice("GC", defaults.gc, ("auto", "tuned", "untouched")),
            log_level=reader.choice(
                "LOG_LEVEL", defaults.log_level, ("debug", "info", "warning", "error", "critical")
            ),
        )


def variable_warnings(
    environ: Mapping[str, str] | None = None, *, serving: bool = True
) -> list[str]:
    """One line for each ``WSFANOUT_*`` variable that nothing reads (a misspelling: it
    names the closest known one), and, ``serving``, for ``WSFANOUT_API_KEY`` set where
    the server reads ``WSFANOUT_API_KEYS``."""
    env = os.environ if environ is None else environ
    reader = _EnvReader({})
    Settings._read(reader)  # the names Settings reads, as it reads them
    known = reader.names | ELSEWHERE
    lines = []
    for full in sorted(env):
        name = full.removeprefix(PREFIX)
        if not full.startswith(PREFIX) or name in known or name in TESTS_ONLY:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {PREFIX}{close[0]}?" if close else ""
        lines.append(f"{full} is not a wsfanout setting and is ignored{hint}")
    if (
        serving
        and env.get(f"{PREFIX}API_KEY", "").strip()
        and not env.get(f"{PREFIX}API_KEYS", "").strip()
    ):
        lines.append(
            f"{PREFIX}API_KEY is set, but the server reads {PREFIX}API_KEYS (comma-separated); "
            f"{PREFIX}API_KEY is the key the wsfanout commands send"
        )
    return lines


class _EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.names: set[str] = set()  # every name asked for, without the prefix

    def _raw(self, name: str) -> tuple[str, str]:
        self.names.add(name)
        full = f"{PREFIX}{name}"
        return full, self._env.get(full, "").strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name)[1] or default

    def url(self, name: str, schemes: tuple[str, ...]) -> str:
        """A URL with one of these schemes, or "" when unset."""
        full, raw = self._raw(name)
        scheme, sep, _ = raw.partition("://")
        expected = "a URL starting with " + " or ".join(f"{s}://" for s in schemes)
        if raw and (not sep or scheme.lower() not in schemes):
            raise ConfigError(full, redact(raw), expected)
        try:
            urllib.parse.urlsplit(raw).port  # noqa: B018 - raises on a bad port or host
        except ValueError as exc:
            raise ConfigError(full, redact(raw), f"{expected} ({exc})") from None
        return raw

    def items(self, name: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in self._raw(name)[1].split(",") if part.strip())

    def origins(self, name: str) -> frozenset[str]:
        """Origins as a browser sends them: ``scheme://host[:port]``, nothing more."""
        full = f"{PREFIX}{name}"
        origins = set()
        for item in self.items(name):
            origin = item.rstrip("/")
            try:
                parts = urllib.parse.urlsplit(origin)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                parts = urllib.parse.urlsplit("")
            if (
                parts.scheme not in {"http", "https"}
                or not parts.hostname
                or "@" in parts.netloc
                or parts.path
                or parts.query
                or parts.fragment
            ):
                raise ConfigError(
                    full,
                    item,
                    "origins as browsers send them, comma-separated: scheme, host and any "
                    "port, such as https://app.example.com",
                )
            origins.add(origin)
        return frozenset(origins)

    def integer(self, name: str, default: int, *, low: int = 1) -> int:
        full, raw = self._raw(name)
        if not raw:
            return default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(full, raw, f"a whole number >= {low}") from None
        if value < low:
            raise ConfigError(full, raw, f"a whole number >= {low}")
        return value

    def number(self, name: str, default: float, *, low: float) -> float:
        full, raw = self._raw(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(full, raw, f"a number >= {low:g}") from None
        if not value >= low or value == float("inf"):
            raise ConfigError(full, raw, f"a finite number >= {low:g}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        full, raw = self._raw(name)
        if not raw:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(full, raw, "on or off (or true/false, yes/no, 1/0)")

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        full, raw = self._raw(name)
        if not raw:
            return default
        if raw.lower() not in options:
            raise ConfigError(full, raw, "one of " + ", ".join(options))
        return raw.lower()

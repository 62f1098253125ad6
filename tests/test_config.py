"""Settings.from_env: defaults, parsing, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.server import ROOT
from wsfanout.config import ConfigError, Settings, redact, variable_warnings


def test_defaults_match_the_design() -> None:
    """With no variables set, every knob has the documented default."""
    settings = Settings.from_env({})
    assert settings.data_dir == Path("data")
    assert settings.database_path == Path("data/wsfanout.sqlite3")
    assert settings.session_max_age == 1_209_600
    assert settings.cookie_secure is False
    assert settings.allowed_origins == frozenset()
    assert settings.max_frame_bytes == 65_536
    assert settings.outbox_bytes == 1_048_576
    assert settings.batch_max == 256
    assert settings.max_connections == 50_000
    assert settings.api_keys == ()
    assert settings.redis_url == ""
    assert settings.amqp_queue == "wsfanout"
    assert settings.log_level == "info"


def test_variables_are_read() -> None:
    """Every kind of variable is parsed: paths, lists, flags, numbers."""
    settings = Settings.from_env(
        {
            "WSFANOUT_DATA_DIR": "/srv/ws",
            "WSFANOUT_SECRET_KEY": "new, old",
            "WSFANOUT_COOKIE_SECURE": "yes",
            "WSFANOUT_ALLOWED_ORIGINS": "https://a.example/, https://b.example",
            "WSFANOUT_OUTBOX_BYTES": "2_048",
            "WSFANOUT_SESSION_MAX_AGE": "60",
            "WSFANOUT_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.database_path == Path("/srv/ws/wsfanout.sqlite3")
    assert settings.secret_keys == ("new", "old")
    assert settings.cookie_secure is True
    assert settings.allowed_origins == {"https://a.example", "https://b.example"}
    assert settings.outbox_bytes == 2048
    assert settings.session_max_age == 60
    assert settings.log_level == "debug"


def test_database_overrides_data_dir() -> None:
    """WSFANOUT_DATABASE names the SQLite file directly."""
    settings = Settings.from_env({"WSFANOUT_DATABASE": "/tmp/x.db"})
    assert settings.database_path == Path("/tmp/x.db")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WSFANOUT_OUTBOX_BYTES", "lots"),
        ("WSFANOUT_OUTBOX_BYTES", "10"),
        ("WSFANOUT_MAX_FRAME_BYTES", "-1"),
        ("WSFANOUT_BATCH_MAX", "0"),
        ("WSFANOUT_COOKIE_SECURE", "maybe"),
        ("WSFANOUT_SESSION_MAX_AGE", "nan"),
        ("WSFANOUT_SESSION_MAX_AGE", "inf"),
        ("WSFANOUT_LOG_LEVEL", "loud"),
        ("WSFANOUT_COMPRESSION", "gzip"),
        ("WSFANOUT_REDIS_URL", "localhost:6379"),
        ("WSFANOUT_REDIS_URL", "http://127.0.0.1:6379"),
        ("WSFANOUT_AMQP_URL", "127.0.0.1:5672"),
        ("WSFANOUT_ALLOWED_ORIGINS", "app.example.com"),
        ("WSFANOUT_ALLOWED_ORIGINS", "https://app.example.com/chat"),
        ("WSFANOUT_ALLOWED_ORIGINS", "ftp://app.example.com"),
        ("WSFANOUT_ALLOWED_ORIGINS", "https://user@app.example.com"),
        ("WSFANOUT_ALLOWED_ORIGINS", "https://app.example.com:port"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    """An unusable value raises ConfigError naming the variable and the value."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"WSFANOUT_COMPRESSION": "on"}, "compression", True),
        ({"WSFANOUT_COMPRESSION": "off"}, "compression", False),
        ({}, "compression", False),
        ({"WSFANOUT_REDIS_URL": "rediss://h:6380/1"}, "redis_url", "rediss://h:6380/1"),
        ({"WSFANOUT_AMQP_URL": "amqp://g:g@h/"}, "amqp_url", "amqp://g:g@h/"),
    ],
)
def test_compression_and_urls(env: dict[str, str], field: str, expected: object) -> None:
    """Compression is off unless asked for; URLs with a known scheme are taken as given."""
    assert getattr(Settings.from_env(env), field) == expected


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, True),
        ({"WSFANOUT_HISTORY_SIZE": "0"}, False),
        ({"WSFANOUT_HISTORY_TTL": "0"}, False),
        # The in-memory bound of one node: it does not turn Redis's history off.
        ({"WSFANOUT_HISTORY_BYTES": "0"}, True),
    ],
)
def test_what_turns_history_off(env: dict[str, str], on: bool) -> None:
    assert Settings.from_env(env).history_on is on


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw@h:5432/d", "postgresql://u:***@h:5432/d"),
        (
            "postgresql://u@h/d?password=pw&search_path=s",
            "postgresql://u@h/d?password=***&search_path=s",
        ),
        ("postgresql://u@h/d?search_path=s", "postgresql://u@h/d?search_path=s"),
        ("postgresql://h/d", "postgresql://h/d"),
        ("postgresql://u:pw@[::1/d", "postgresql://***"),
    ],
)
def test_passwords_never_reach_messages(url: str, expected: str) -> None:
    """The URL shown in logs and errors has no password, wherever it was written."""
    assert redact(url) == expected


@pytest.mark.parametrize(
    "value",
    [
        "mysql://app:secret@h/db",
        "postgresql://app:secret@h:54a2/db",
        "postgresql://app:secret@[::1/db",
        "postgresql://app:secret@h:99999/db",
    ],
)
def test_a_bad_database_url_is_one_line_without_its_password(value: str) -> None:
    """A database URL of another scheme, or with a port or host that cannot be, is refused
    at start naming the variable, and the message does not show the password."""
    with pytest.raises(ConfigError, match="WSFANOUT_DATABASE_URL") as caught:
        Settings.from_env({"WSFANOUT_DATABASE_URL": value})
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"WSFANOUT_WEBHOOK_URL": "http://h/hook"}, "WSFANOUT_WEBHOOK_SECRET"),
        ({"WSFANOUT_WEBHOOK_URL": "http://h/hook", "WSFANOUT_WEBHOOK_SECRET": "short"}, "16"),
        ({"WSFANOUT_WEBHOOK_URL": "ftp://h/", "WSFANOUT_WEBHOOK_SECRET": "s" * 16}, "http://"),
        ({"WSFANOUT_WEBHOOK_URL": "http:///hook", "WSFANOUT_WEBHOOK_SECRET": "s" * 16}, "host"),
        ({"WSFANOUT_WEBHOOK_URL": "https://u:pw@h/", "WSFANOUT_WEBHOOK_SECRET": "s" * 16}, "user"),
    ],
)
def test_a_webhook_needs_a_url_with_a_host_and_a_real_secret(
    env: dict[str, str], problem: str
) -> None:
    """A webhook URL without a secret (or a short one), of another scheme, without a host,
    or carrying a password is refused at start, in one line that names what is wrong and
    shows neither the password nor the secret."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert problem in str(caught.value)
    assert "pw" not in str(caught.value) and "short" not in str(caught.value)
    good = {"WSFANOUT_WEBHOOK_URL": "https://h:8443/hook?x=1", "WSFANOUT_WEBHOOK_SECRET": "s" * 16}
    assert Settings.from_env(good).webhook_url == good["WSFANOUT_WEBHOOK_URL"]


@pytest.mark.parametrize(
    ("env", "warnings"),
    [
        (
            {"WSFANOUT_REDIS": "redis://h"},
            [
                "WSFANOUT_REDIS is not a wsfanout setting and is ignored; did you mean "
                "WSFANOUT_REDIS_URL?"
            ],
        ),
        (
            {"WSFANOUT_DATABSE_URL": "postgresql://h/db"},
            [
                "WSFANOUT_DATABSE_URL is not a wsfanout setting and is ignored; did you mean "
                "WSFANOUT_DATABASE_URL?"
            ],
        ),
        ({"WSFANOUT_XYZZY": "1"}, ["WSFANOUT_XYZZY is not a wsfanout setting and is ignored"]),
        (
            {"WSFANOUT_API_KEY": "k"},
            [
                "WSFANOUT_API_KEY is set, but the server reads WSFANOUT_API_KEYS "
                "(comma-separated); WSFANOUT_API_KEY is the key the wsfanout commands send"
            ],
        ),
        ({"WSFANOUT_API_KEY": "k", "WSFANOUT_API_KEYS": "k"}, []),
        ({"WSFANOUT_URL": "http://h", "WSFANOUT_SERVER": "uvicorn", "WSFANOUT_BIND": "h:1"}, []),
        ({"WSFANOUT_URL_SINGLE": "ws://h/", "WSFANOUT_CONTROL": "http://h/"}, []),  # JS tests
        ({"WSFANOUT_HISTORY_TTL": "1", "WSFANOUT_MAX_FRAME_BYTES": "1", "HOME": "/"}, []),
    ],
)
def test_variables_nothing_reads_are_named_with_the_closest_known(
    env: dict[str, str], warnings: list[str]
) -> None:
    """A WSFANOUT_* variable nothing reads gets one line naming the closest known name;
    WSFANOUT_API_KEY alone, a hint that the server reads WSFANOUT_API_KEYS."""
    assert variable_warnings(env) == warnings


def test_every_variable_the_project_names_is_known() -> None:
    """Every WSFANOUT_* name in the code, the page, the clients, the examples, the Justfile
    and the README is one that something reads: none of them would be warned about."""
    files = [ROOT / "Justfile", ROOT / "Containerfile", ROOT / "README.md"]
    for folder, pattern in [("src", "*.py"), ("web", "*.js"), ("examples", "*.py")]:
        files += (ROOT / folder).rglob(pattern)
    files += (ROOT / "clients/js").glob("*.ts")
    files += (ROOT / "clients/js/test").glob("*.js")
    names = set()
    for path in files:
        names |= set(re.findall(r"\bWSFANOUT_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    for path in (ROOT / "bench").glob("*.py"):  # its own constants are named WSFANOUT_* too
        names |= set(re.findall(r"[\"']\b(WSFANOUT_[A-Z0-9_]*[A-Z0-9])[\"']", path.read_text()))
    assert "WSFANOUT_REDIS_URL" in names
    assert variable_warnings(dict.fromkeys(names, "x"), serving=False) == []

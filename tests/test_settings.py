"""`Settings.from_env`: a flag wins, then the environment, then the one default."""

from __future__ import annotations

from pathlib import Path

import pytest

from skydeck.backends.claude_warm import WarmConfig
from skydeck.service import KEEPALIVE_S, ConfigError, Settings


def test_flags_then_environment_then_defaults() -> None:
    env = {
        "SKYDECK_HOST": "127.0.0.2",
        "PORT": "8080",
        "SKYDECK_DATA_DIR": "/tmp/sd",
        "SKYDECK_MAX_TURNS": "9",
        "SKYDECK_ALLOWED_HOSTS": "a.example, b.example,",
        "SKYDECK_TOKEN": "",  # empty: unset
    }
    settings = Settings.from_env(env, port=0, max_turns=None, demo=False)
    assert settings.host == "127.0.0.2"
    assert settings.port == 0, "a flag of 0 is a value (pick a free port), not unset"
    assert settings.data_dir == Path("/tmp/sd")
    assert settings.max_turns == 9
    assert settings.allowed_hosts == ("a.example", "b.example")
    assert settings.token is None
    assert settings.demo is False
    assert settings.keepalive_s == KEEPALIVE_S == Settings().keepalive_s
    assert Settings.from_env({"SKYDECK_PORT": "1", "PORT": "2"}).port == 1


def test_defaults_are_the_dataclass_defaults() -> None:
    assert Settings.from_env({}) == Settings(data_dir=Settings().data_dir)


def test_a_bad_number_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match="port must be a number, not 'eighty'"):
        Settings.from_env({"SKYDECK_PORT": "eighty"})


def test_w9_w10_warm_claude_settings_come_from_the_environment() -> None:
    env = {"SKYDECK_CLAUDE_WARM_MAX": "2", "SKYDECK_CLAUDE_WARM_IDLE_S": "30"}
    assert Settings.from_env(env).claude_warm == WarmConfig(max_processes=2, idle_s=30)
    assert not Settings.from_env({"SKYDECK_CLAUDE_WARM": "off"}).claude_warm.active
    with pytest.raises(ConfigError, match="SKYDECK_CLAUDE_WARM must be on or off, not 'maybe'"):
        Settings.from_env({"SKYDECK_CLAUDE_WARM": "maybe"})


def test_p7_store_schema_is_an_sql_name_not_more_libpq_options() -> None:
    """The schema goes into libpq's options as ``-c search_path=...``: a space would
    add any setting (say, no statement timeout) without a word."""
    sneaky = Settings.from_env({"SKYDECK_STORE_SCHEMA": "skydeck -c statement_timeout=0"})
    with pytest.raises(ConfigError, match="--store-schema 'skydeck -c statement_timeout=0'"):
        sneaky.check()
    Settings.from_env({"SKYDECK_STORE_SCHEMA": "skydeck_2"}).check()

"""Timeouts of server engines: values that clickhouse-connect would reject only at the first connection fail early."""

from __future__ import annotations

from typing import Any

import pytest

from llmtrace import ConfigurationError, get_engine

URL = "clickhousedb://default:s3cret@clickhouse.example:8123/traces"


@pytest.mark.parametrize(
    ("query", "connect_args", "message"),
    [
        ("?send_receive_timeout=thirty", {}, "send_receive_timeout must be a whole number of seconds"),
        ("?connect_timeout=0", {}, "connect_timeout must be a whole number of seconds greater than 0, got '0'"),
        ("?send_receive_timeout=2.5", {}, "got '2.5'"),
        ("", {"send_receive_timeout": -1}, "got -1"),
        ("", {"connect_timeout": 1.5}, "got 1.5"),
    ],
)
def test_bad_timeouts_are_configuration_errors(query: str, connect_args: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        get_engine(URL + query, connect_args=connect_args)
    assert "s3cret" not in str(caught.value)


def test_none_in_connect_args_lifts_the_limit() -> None:
    # clickhouse-connect's own way to wait without limit; an explicit choice, so it is accepted.
    get_engine(URL, connect_args={"send_receive_timeout": None}).dispose()

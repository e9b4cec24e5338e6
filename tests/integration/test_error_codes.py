"""The transient ClickHouse error codes are spelled as the embedded ClickHouse (26.9) names them."""

from __future__ import annotations

from sqlalchemy import Engine, text

from llmtrace.errors import TRANSIENT_ERROR_CODES


def test_transient_codes_match_clickhouse_names(engine: Engine) -> None:
    codes = sorted(TRANSIENT_ERROR_CODES)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT code, errorCodeToName(code) FROM (SELECT arrayJoin(:codes) AS code)"), {"codes": codes}
        ).all()
    assert {code: name for code, name in rows} == dict(TRANSIENT_ERROR_CODES)

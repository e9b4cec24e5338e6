"""AlterTableDelete refuses to be built without a condition: that statement would erase the whole table."""

from __future__ import annotations

import pytest

from llmtrace.alter_delete import AlterTableDelete
from llmtrace.record import TRACES_TABLE


def test_a_delete_without_conditions_is_refused() -> None:
    with pytest.raises(ValueError, match="AlterTableDelete needs at least one condition"):
        AlterTableDelete(TRACES_TABLE)

"""The insert deduplication token of a batch: what makes a retried insert idempotent.

ClickHouse remembers the tokens of a table's most recent inserts (``non_replicated_deduplication_window``)
and skips an insert whose token it has already seen. A token derived from the batch alone would also skip a
batch written again after its traces were deleted, because a delete removes rows, not remembered tokens:
``add_many`` would report traces as written that ClickHouse silently dropped. So the token also carries the
number of the table's latest mutation. Every delete is a mutation and raises that number, while a retry of a
batch (with no delete in between) sees the same number and gets the same token.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmtrace.record import TABLE_NAME

# Mutation ids are "mutation_<n>.txt" on a single server and zero-padded numbers on replicated tables; both
# grow with every mutation. A user who may not see the table's mutations should read 0 (system tables list
# only what a user may see; the tests run on the embedded engine only), i.e. a token without it.
_LATEST_MUTATION = (
    "SELECT max(toUInt64OrZero(extract(mutation_id, '[0-9]+'))) FROM system.mutations "
    "WHERE database = currentDatabase() AND table = %(table)s"
)


def latest_mutation(client: Any) -> int:
    """The number of the traces table's latest mutation (0 if it has none)."""
    return int(client.query(_LATEST_MUTATION, parameters={"table": TABLE_NAME}).result_rows[0][0])


def batch_token(organization_ids: list[str], ids: list[str], *, mutation: int) -> str:
    """The token of a batch: a digest of its identities ``(organization_id, id)`` in order, and ``mutation``.

    A retry sends the same traces in the same order and so gets the same token. The identities are digested
    as JSON, which is unambiguous (no two different pairs of lists serialise alike) and fast.
    """
    listed = json.dumps([mutation, organization_ids, ids], ensure_ascii=False)
    return hashlib.sha256(listed.encode("utf-8", "surrogatepass")).hexdigest()

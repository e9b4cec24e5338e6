"""The insert deduplication token: equal exactly when the batch's identities and the mutation number are."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmtrace.insert_token import batch_token

# Short strings over a few characters, including the ones a careless encoding would confuse (separators,
# quotes, backslashes, surrogates), so that different batches often look alike.
texts = st.text(alphabet=st.sampled_from(["a", "b", ",", '"', "\\", "\x00", "\ud800", "é"]), max_size=3)
batches = st.integers(0, 3).flatmap(
    lambda size: st.tuples(st.lists(texts, min_size=size, max_size=size), st.lists(texts, min_size=size, max_size=size))
)


@given(first=batches, second=batches, mutations=st.tuples(st.integers(0, 2), st.integers(0, 2)))
def test_tokens_are_equal_exactly_when_the_inputs_are(
    first: tuple[list[str], list[str]], second: tuple[list[str], list[str]], mutations: tuple[int, int]
) -> None:
    same_input = first == second and mutations[0] == mutations[1]
    tokens = batch_token(*first, mutation=mutations[0]), batch_token(*second, mutation=mutations[1])
    assert (tokens[0] == tokens[1]) == same_input


def test_a_delete_changes_the_token_of_the_same_batch() -> None:
    organizations, ids = ["org-1", "org-1"], ["a", "b"]
    assert batch_token(organizations, ids, mutation=3) == batch_token(organizations, ids, mutation=3)
    assert batch_token(organizations, ids, mutation=3) != batch_token(organizations, ids, mutation=4)

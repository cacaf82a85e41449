"""PromptStore: a job's prompts in a few bytes a token, and their depth-first order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedbatch.requests.prompt_store import MIN_SHARED, PromptStore, common_prefix

token_lists = st.lists(st.integers(0, 70_000), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    heads=st.lists(st.lists(st.integers(0, 5), max_size=40), min_size=1, max_size=3),
    picks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), token_lists), max_size=60),
    vocab=st.sampled_from([6, 70_001]),
)
def test_tokens_come_back_and_the_order_is_sorted_lists(heads, picks, vocab):
    prompts = []
    for which, cut, tail in picks:
        head = heads[which % len(heads)][:cut]
        prompts.append(head + [t % vocab for t in tail])
    store = PromptStore(vocab)
    for p in prompts:
        store.append(p)
    assert len(store) == len(prompts)
    assert [list(store.tokens(k)) for k in range(len(prompts))] == prompts
    # Python sorts lists the same way: a prefix first, equal lists in their given order.
    order = store.order()
    assert order.tolist() == sorted(range(len(prompts)), key=lambda i: prompts[i])
    ranked = [prompts[k] for k in order]
    lcps = [0] + [common_prefix(a, b) for a, b in zip(ranked, ranked[1:])]
    assert store.common_prefixes(order).tolist() == lcps[: len(prompts)]
    assert store.lengths().tolist() == [len(p) for p in prompts]


def test_a_shared_instruction_is_stored_once():
    rng = random.Random(0)
    instruction = [rng.randrange(49_152) for _ in range(1_000)]
    store = PromptStore(49_152)
    for _ in range(1_000):
        store.append(instruction + [rng.randrange(49_152) for _ in range(rng.randint(1, 50))])
    # 2 bytes a token of each own tail, 24 bytes a prompt of bookkeeping, one instruction:
    # far below the 4,000+ bytes a prompt of 1,000 int32 tokens.
    assert store.nbytes < 1_000 * (2 * 50 + 24) + 2 * 1_000
    assert list(store.tokens(999))[:1_000] == instruction


def test_prompts_sharing_little_start_a_new_base():
    store = PromptStore(100)
    a = list(range(40))
    b = a[: MIN_SHARED - 1] + [99] * 30  # shares too little with a: stored whole
    c = b[:35] + [1]
    for p in (a, b, c):
        store.append(p)
    assert [list(store.tokens(k)) for k in range(3)] == [a, b, c]
    assert store.nbytes == 2 * (40 + 45 + 1) + 8 * 4 + 8 * 3 * 2


def test_ids_beyond_two_bytes_are_kept_whole():
    store = PromptStore(1 << 17)
    store.append([0, 1 << 16, (1 << 17) - 1])
    assert list(store.tokens(0)) == [0, 1 << 16, (1 << 17) - 1]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5] * 100 + [1], [5] * 100 + [2]) == 100

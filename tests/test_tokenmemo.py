from __future__ import annotations

import pytest

from broker.model import AccessToken
from broker.tokenmemo import MAX_ENTRIES, TokenMemo

TOKEN = AccessToken("ya29.x", 5000.0)


def test_entry_is_served_until_the_earlier_of_its_deadline_and_the_ttl():
    memo = TokenMemo(30)
    memo.put("k", TOKEN, "g1", now=1000, until=1010)
    entry = memo.get("k", 1009.9)
    assert entry is not None and entry.token == TOKEN and entry.generation == "g1"
    assert memo.get("k", 1010) is None
    memo.put("k", TOKEN, "g1", now=1000, until=4000)
    assert memo.get("k", 1029.9) is not None and memo.get("k", 1030) is None


def test_nothing_kept_past_its_deadline_and_clear_forgets_everything():
    memo = TokenMemo(30)
    memo.put("gone", TOKEN, "", now=1000, until=999)
    assert memo.get("gone", 1000) is None and len(memo) == 0
    memo.put("k", TOKEN, "", now=1000, until=2000)
    memo.clear()
    assert memo.get("k", 1000) is None


def test_bounded_in_entries_and_in_ttl():
    memo = TokenMemo(5)
    for i in range(MAX_ENTRIES + 1):
        memo.put(f"k{i}", TOKEN, "", now=0, until=100)
    assert len(memo) <= MAX_ENTRIES
    for ttl in (-1, 31):
        with pytest.raises(ValueError):
            TokenMemo(ttl)

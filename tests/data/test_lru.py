import pytest

from spacy_m3el.data.lru import LRUCache


def test_evicts_least_recently_used_by_count():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2


def test_evicts_by_bytes_but_keeps_the_newest_item():
    cache = LRUCache(10, max_bytes=10, sizeof=len)
    cache.put("a", "xxxx")
    cache.put("b", "yyyy")
    cache.put("c", "zzzz")
    assert list(cache.items) == ["b", "c"] and cache.bytes == 8
    cache.put("big", "w" * 50)  # larger than the bound on its own: kept alone
    assert list(cache.items) == ["big"] and cache.bytes == 50
    cache.put("big", "v")
    assert cache.bytes == 1
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="sizeof"):
        LRUCache(1, max_bytes=5)


def test_a_put_without_eviction_keeps_what_is_stored():
    cache = LRUCache(3, max_bytes=10, sizeof=len)
    assert cache.put("a", "xxxx") and cache.put("b", "yyyy", evict=False)
    assert not cache.put("c", "zzzz", evict=False)  # 12 bytes > 10: left out, nothing evicted
    assert list(cache.items) == ["a", "b"] and cache.bytes == 8
    assert cache.put("c", "zz", evict=False) and list(cache.items) == ["a", "b", "c"]
    assert not cache.put("d", "", evict=False)  # the item bound
    assert cache.put("a", "x", evict=False) and cache.bytes == 7  # a stored key is replaced
    assert not cache.put("a", "xxxxxxx", evict=False) and cache.get("a") == "x"  # unless the new value overflows
    assert cache.put("d", "dddd") and "b" not in cache  # with eviction, as before

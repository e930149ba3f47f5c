"""The consistent-hash ring bench/affinity.py routes with: every call about one model goes to one
replica, models spread over replicas, and a third replica takes about a third of them from the rest
(only those: none moves between the two that stay)."""

from __future__ import annotations

from bench.affinity import Ring
from service.client.library import routing_metadata


def test_one_model_one_replica_spread_and_consistent() -> None:
    two = Ring(["127.0.0.1:1", "127.0.0.1:2"])
    three = Ring(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    keys = [routing_metadata(f"model-{i}")[0][1] for i in range(3000)]
    assert all(two.pick(k) == two.pick(k) for k in keys[:50])
    share = sum(two.pick(k) == "127.0.0.1:1" for k in keys) / len(keys)
    assert 0.4 < share < 0.6, share
    moved = [k for k in keys if two.pick(k) != three.pick(k)]
    assert all(three.pick(k) == "127.0.0.1:3" for k in moved)  # moves go to the new replica only
    assert 0.25 < len(moved) / len(keys) < 0.42, len(moved) / len(keys)

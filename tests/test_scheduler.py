"""The scheduler's admission and preemption choices (pure bookkeeping, golden cases)."""

from __future__ import annotations

import pytest

from specdec.errors import ConfigError
from specdec.serving.scheduler import Scheduler

NEED = {"a": 3, "b": 5, "c": 2, "huge": 100}


def test_fcfs_admission_without_overtaking():
    s = Scheduler(max_batch_size=4)
    for r in ("a", "b", "c"):
        s.add(r)
    # 7 free blocks: a (3) fits, b (5) does not; c (2) would fit but must not overtake b
    assert s.admit(free_blocks=7, total_blocks=10, blocks_to_admit=NEED.get) == (["a"], [])
    assert list(s.waiting) == ["b", "c"]
    assert s.admit(free_blocks=7, total_blocks=10, blocks_to_admit=NEED.get) == (["b", "c"], [])
    assert s.running == ["a", "b", "c"]


def test_batch_size_cap():
    s = Scheduler(max_batch_size=2)
    for r in ("a", "b", "c"):
        s.add(r)
    assert s.admit(100, 100, NEED.get)[0] == ["a", "b"]
    s.finish("a")
    assert s.admit(100, 100, NEED.get)[0] == ["c"] and s.running == ["b", "c"]


def test_too_large_is_reported_and_skipped():
    s = Scheduler(max_batch_size=4)
    for r in ("huge", "a"):
        s.add(r)
    assert s.admit(10, 10, NEED.get) == (["a"], ["huge"])
    assert not s.waiting


def test_victim_is_newest_and_requeues_in_front():
    s = Scheduler(max_batch_size=4)
    for r in ("a", "b", "c"):
        s.add(r)
    s.admit(5, 10, NEED.get)  # admits a only
    s.admit(10, 10, NEED.get)  # then b and c
    assert s.victim() == "c"
    s.requeue("c")
    s.add("d")
    assert list(s.waiting) == ["c", "d"] and s.running == ["a", "b"]
    assert not s.done


@pytest.mark.parametrize("kwargs, fragment", [({"max_batch_size": 0}, "max_batch_size"),
                                              ({"max_batch_size": 2, "policy": "drop"}, "preemption policy")])
def test_bad_options(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Scheduler(**kwargs)

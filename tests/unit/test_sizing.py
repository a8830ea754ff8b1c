"""The adaptive group size: additive increase on clean commits up to the cap, halving on each conflict."""

from __future__ import annotations

from agent_workers.training.sizing import GroupSizer


def test_a_model_starts_at_the_start_size_and_grows_by_one_per_clean_commit_up_to_the_cap() -> None:
    sizer = GroupSizer(start=8, cap=11)
    seen = [sizer.size("m")]
    for _ in range(5):
        seen.append(sizer.observe("m", steps=seen[-1], conflicts=0))
    assert seen == [8, 9, 10, 11, 11, 11]


def test_each_conflict_halves_the_size_down_to_one() -> None:
    sizer = GroupSizer(start=8, cap=32)
    assert sizer.observe("m", steps=8, conflicts=1) == 4
    assert sizer.observe("m", steps=4, conflicts=2) == 1
    assert sizer.observe("m", steps=1, conflicts=3) == 1
    assert sizer.observe("m", steps=1, conflicts=0) == 2


def test_models_are_sized_apart_and_a_group_that_never_committed_leaves_the_size() -> None:
    sizer = GroupSizer(start=8, cap=32)
    sizer.observe("busy", steps=8, conflicts=1)
    assert sizer.observe("busy", steps=0, conflicts=0) == 4
    assert (sizer.size("busy"), sizer.size("quiet")) == (4, 8)


def test_a_cap_below_the_start_keeps_the_start_as_the_largest_size() -> None:
    sizer = GroupSizer(start=8, cap=4)
    assert sizer.observe("m", steps=8, conflicts=0) == 8


def test_the_largest_next_group_of_any_model_sets_when_a_buffer_is_full() -> None:
    sizer = GroupSizer(start=8, cap=32)
    assert sizer.largest() == 8
    sizer.observe("a", steps=8, conflicts=1)
    assert sizer.largest() == 4
    sizer.observe("b", steps=8, conflicts=0)
    assert sizer.largest() == 9

"""Selection items: held out of the train split as whole facts, never more than half."""

from seap.data.selection import split_train
from seap.data.starter import STARTER_TASKS, starter_records


def test_held_out_items_share_no_fact_with_the_calibrating_part():
    for task in STARTER_TASKS:
        records = starter_records(task, "calibration")
        train, held = split_train(records, 100, seed=0)
        assert len(train) + len(held) == len(records)
        assert 0 < len(held) <= len(records) // 2
        assert len(held) >= min(100, len(records) // 2) - 5  # whole groups of up to 5 templates
        calibrated = {r.get("group") for r in train}
        assert not {r["group"] for r in held if "group" in r} & calibrated, task


def test_records_without_groups_are_drawn_one_by_one_and_reproducibly():
    records = [{"question": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(40)]
    train, held = split_train(records, 7, seed=3)
    assert len(held) == 7 and (train, held) == split_train(records, 7, seed=3)
    assert split_train(records, 7, seed=4)[1] != held
    assert split_train(records, 100, seed=3)[1].__len__() == 20  # at most half


def test_a_group_larger_than_half_the_split_is_never_held_out():
    records = [{"question": f"q{i}", "choices": ["a", "b"], "answer": 0, "group": "big" if i < 8 else f"g{i}"}
               for i in range(12)]
    train, held = split_train(records, 6, seed=0)
    assert all(r["group"] != "big" for r in held) and len(held) == 4

"""Grouped, stratified splits: no leakage, balance per city, determinism, clear errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from citylib.data.splits import SPLITS, SplitError, leakage_report, split_groups, split_table


def records(groups_per_city=(40, 25, 60), max_size=5, seed=0) -> pd.DataFrame:
    """Cities of groups with 1..max_size images each (like panoramas with several views)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(groups_per_city):
        for g in range(n):
            rows += [(f"city{c}", f"c{c}g{g}", f"c{c}g{g}v{v}.jpg") for v in range(rng.integers(1, max_size + 1))]
    return pd.DataFrame(rows, columns=["city", "group", "path"])


def deviation(frame: pd.DataFrame, split: pd.Series, ratios) -> float:
    """Largest gap, over cities and splits, between a split's share of a city and its target."""
    table = pd.crosstab(frame["city"], split).reindex(columns=list(SPLITS), fill_value=0)
    shares = table.div(table.sum(axis=1), axis=0).to_numpy()
    return float(np.abs(shares - np.asarray(ratios) / np.sum(ratios)).max())


@pytest.mark.parametrize("ratios", [(6, 2, 2), (4, 1, 1), (3, 1, 1)])
def test_no_leakage_and_balanced(ratios):
    frame = records()
    frame["split"] = split_groups(frame, ratios, seed=0)
    assert set(frame["split"]) == set(SPLITS)
    assert leakage_report(frame).empty
    assert frame.groupby("group")["split"].nunique().max() == 1
    # Whole groups of up to 5 images: each city can miss its target by about one group.
    assert deviation(frame, frame["split"], ratios) < 0.05
    assert (frame.groupby("city")["split"].nunique() == 3).all()


def test_deterministic_and_independent_of_row_order():
    frame = records()
    a = split_groups(frame, (6, 2, 2), seed=1)
    assert a.equals(split_groups(frame, (6, 2, 2), seed=1))
    shuffled = frame.sample(frac=1.0, random_state=3)
    assert split_groups(shuffled, (6, 2, 2), seed=1).sort_index().equals(a)
    assert not a.equals(split_groups(frame, (6, 2, 2), seed=2))


def test_a_city_does_not_move_when_another_is_added():
    frame = records()
    a = split_groups(frame, (6, 2, 2), seed=0)
    more = pd.concat([frame, records((10,), seed=1).assign(city="extra", group=lambda f: "x" + f["group"])])
    b = split_groups(more, (6, 2, 2), seed=0)
    assert b.iloc[:len(frame)].equals(a)


def test_three_groups_give_one_per_split_and_fewer_fail():
    frame = pd.DataFrame({"city": ["a"] * 5 + ["b"] * 3, "group": ["a1", "a1", "a1", "a2", "a3", "b1", "b2", "b3"]})
    split = split_groups(frame, (6, 2, 2), seed=0)
    assert (pd.crosstab(frame["city"], split) > 0).all().all()
    assert split[frame["group"] == "a1"].eq("train").all()  # the biggest group goes to train
    with pytest.raises(SplitError, match="'b' has 2 group"):
        split_groups(frame[frame["group"] != "b3"], (6, 2, 2), seed=0)


def test_group_spanning_cities_is_named():
    frame = pd.DataFrame({"city": ["a", "a", "a", "b", "b", "b"], "group": ["g1", "g2", "shared", "shared", "h1", "h2"]})
    with pytest.raises(SplitError, match="'shared'.*\\['a', 'b'\\]"):
        split_groups(frame, (6, 2, 2), seed=0)


def test_bad_ratios():
    with pytest.raises(SplitError, match="ratios"):
        split_groups(records(), (1, 0, 1), seed=0)


def test_leakage_report_finds_a_leak():
    frame = records()
    frame["split"] = split_groups(frame, (6, 2, 2), seed=0)
    big = frame["group"].value_counts().index[0]  # a group with several images
    row = frame.index[frame["group"] == big][0]
    frame.loc[row, "split"] = "test" if frame.loc[row, "split"] != "test" else "train"
    report = leakage_report(frame)
    assert list(report["group"]) == [big] and "," in report["splits"][0]
    assert report["images"][0] == (frame["group"] == big).sum()


def test_split_table_counts_everything():
    frame = records()
    frame["split"] = split_groups(frame, (4, 1, 1), seed=0)
    table = split_table(frame)
    assert table[list(SPLITS)].to_numpy().sum() == len(frame)
    assert list(table["groups"]) == [40, 25, 60]


def test_as_balanced_as_stratified_group_kfold():
    """Against scikit-learn's StratifiedGroupKFold (5 folds = 3:1:1): both leak-free, similar balance."""
    frame = records(groups_per_city=(80, 50, 120), max_size=6, seed=4)
    ours = split_groups(frame, (3, 1, 1), seed=0)
    folds = np.zeros(len(frame), int)
    for k, (_, test) in enumerate(StratifiedGroupKFold(5, shuffle=True, random_state=0)
                                  .split(frame, frame["city"], frame["group"])):
        folds[test] = k
    theirs = pd.Series(np.where(folds == 0, "test", np.where(folds == 1, "val", "train")), index=frame.index)
    for split in (ours, theirs):
        assert leakage_report(frame.assign(split=split)).empty
    assert deviation(frame, ours, (3, 1, 1)) <= deviation(frame, theirs, (3, 1, 1)) + 0.01

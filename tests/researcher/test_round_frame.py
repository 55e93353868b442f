"""A round's rows as a DataFrame: the same frame pandas would build from the rows."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from fedcore.researcher.round import RoundResult, rows_frame


def _ok_row(i: int) -> dict:
    return {"round": 3, "node": f"node-{i:02d}", "dataset": f"part{i}", "status": "ok",
            "round_trip_s": 0.01 * i, "n_samples": 140 + i, "n_test": 0, "device": "cpu",
            "train_loss": 2.3 - i / 7, "train_steps": 5, "train_epochs": 1,
            "setup_s": 1e-4, "train_s": 3e-3, "total_s": float("nan"), "round_s": 0.04}


ROWS = {
    "ok rows": [_ok_row(i) for i in range(10)],
    "same keys, another order": [_ok_row(0), dict(reversed(_ok_row(1).items()))],
    "a failed node's row": [_ok_row(0), {"round": 3, "node": "node-01", "dataset": "part1",
                                         "status": "failed", "n_samples": 0, "n_test": 0,
                                         "error": "PlanError: boom"}],
    "None among floats": [{**_ok_row(0), "central_epsilon": None},
                          {**_ok_row(1), "central_epsilon": 0.5}],
    "ints and floats in a column": [{"a": 1, "b": "x"}, {"a": 1.5, "b": "y"}],
    "an int beyond int64": [{"a": 2**63}, {"a": 1}],
    "negative and large ints": [{"a": -(2**63)}, {"a": 2**63 - 1}],
    "bools": [{"a": True, "b": False}, {"a": False, "b": False}],
    "ints and bools": [{"a": 1}, {"a": True}],
    "numpy scalars": [{"a": np.float32(1.5)}, {"a": np.float32(2.5)}],
    "dicts": [{"overrides": {"lr": 0.1}, "policy": "p"}, {"overrides": {"lr": 0.2},
                                                          "policy": "q"}],
    "numbers as column names": [{0: "a", 1: 2}, {0: "b", 1: 3}],
    "text that looks like dates": [{"when": "2026-12-07"}, {"when": "2026-12-08"}],
    "one row": [_ok_row(4)],
    "no rows": [],
    "rows without columns": [{}, {}],
    "one column": [{"a": "x"}, {"a": "y"}],
}


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_rows_frame_is_the_frame_pandas_builds(rows):
    expected = pd.DataFrame(rows)
    got = rows_frame(rows)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert list(got.dtypes) == list(expected.dtypes)
    assert got.columns.dtype == expected.columns.dtype
    assert got.index.equals(expected.index) and type(got.index) is type(expected.index)
    assert [type(got[c].array) for c in got] == [type(expected[c].array) for c in expected]


def test_round_result_frame_keeps_its_rows_apart():
    rows = [_ok_row(i) for i in range(3)]
    frame = RoundResult(3, rows, {}).frame
    frame.loc[0, "n_samples"] = -1
    assert rows[0]["n_samples"] == 140
    assert RoundResult(3, rows, {}).frame["n_samples"].tolist() == [140, 141, 142]


def test_rows_frame_follows_pandas_text_settings_between_rounds():
    """The column names are reused from round to round, never across pandas' settings."""
    rows = [_ok_row(i) for i in range(3)]
    rows_frame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the option is deprecated in pandas 3
        try:
            context = pd.option_context("future.infer_string", False)
        except (KeyError, pd.errors.OptionError):
            pytest.skip("this pandas always infers its str dtype")
        with context:
            expected, got = pd.DataFrame(rows), rows_frame(rows)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert got.columns.dtype == expected.columns.dtype
    assert list(got.dtypes) == list(expected.dtypes)
    again = rows_frame(rows)
    assert again.columns.dtype == pd.DataFrame(rows).columns.dtype
    again.columns.name = "mine"
    assert rows_frame(rows).columns.name is None


def test_rows_frame_follows_the_rows_from_round_to_round():
    """What is kept between frames (columns, blocks, index) never outlives the rows' shape."""
    ten = [_ok_row(i) for i in range(10)]
    three = [_ok_row(i) for i in range(3)]
    floats = [{**row, "n_test": 0.5} for row in three]  # same names, another type
    texts = [{**row, "round_s": "slow"} for row in three]
    beyond = [{**row, "n_test": 2**63} for row in three]
    for rows in (ten, three, ten, floats, three, texts, beyond, three):
        expected, got = pd.DataFrame(rows), rows_frame(rows)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        assert list(got.dtypes) == list(expected.dtypes)
        assert got.index.equals(expected.index) and type(got.index) is type(expected.index)


def test_rows_frames_do_not_share_their_axes():
    rows = [_ok_row(i) for i in range(3)]
    first = rows_frame(rows)
    first.index.name, first.columns.name = "node", "column"
    second = rows_frame(rows)
    assert second.index.name is None and second.columns.name is None
    assert not second.columns.is_(rows_frame(rows).columns)
    second.loc[0, "node"] = "elsewhere"
    assert rows_frame(rows).loc[0, "node"] == "node-00"

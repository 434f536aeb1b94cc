"""The majority-class floor recorded beside every classification score."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from finetune.evaluation.scoring import macro_f1, majority_class


def test_the_majority_floor_is_always_answering_the_most_frequent_label():
    dcfg = OmegaConf.create({"label_field": "label", "label_words": ["neg", "pos"]})
    rows = [{"label": y} for y in [1, 1, 1, 0, 1, 0, 1]]
    floor = majority_class(rows, dcfg)
    assert floor["majority_accuracy"] == pytest.approx(5 / 7)
    # F1 of "pos" is 2 x 5 / (2 x 5 + 2) = 0.833, of "neg" 0: their mean
    assert floor["majority_f1"] == pytest.approx((10 / 12) / 2) == macro_f1([r["label"] for r in rows], [1] * 7, 2)
    assert majority_class([], dcfg) == {}

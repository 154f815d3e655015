"""Review gaps of issues 14/16: clear errors instead of silent NaN or silent rounding,
and the nb metric's determined mask."""
import numpy as np
import pytest
import torch

from mmh_fast.lab.measure import roc_stats


@pytest.mark.parametrize("labels, empty", [([True] * 5, "negative"), ([False] * 5, "positive")])
def test_roc_stats_refuses_an_empty_class(labels, empty):
    # AUC and TPR@1%FPR are undefined without both classes: an error naming the labels, never NaN
    with pytest.raises(ValueError, match=rf"labels.*no {empty}"):
        roc_stats(np.arange(5.0), labels)


def test_roc_stats_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="labels"):
        roc_stats(np.arange(5.0), [True, False])

"""The bootstrap interval of AP over images, on cases whose distribution is known by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from facedet.evaluation import average_precision, average_precision_interval

FACE = np.array([[10.0, 10.0, 50.0, 50.0]])
FOUND = (FACE, np.array([0.9]), FACE, None)  # one face, found
MISSED = (np.zeros((0, 4)), np.zeros(0), FACE, None)  # one face, no detection at all


def test_identical_images_give_a_point_interval():
    interval = average_precision_interval([FOUND] * 20, resamples=200)
    assert interval.value == interval.low == interval.high == 1.0


def test_half_found_follows_the_binomial_distribution_of_recall():
    # With k found images out of n resampled, every detection is correct: precision 1 up to recall k/n, so AP = k/n.
    images = [FOUND, MISSED] * 50
    interval = average_precision_interval(images, resamples=4000, seed=1)
    assert interval.value == pytest.approx(average_precision(images)) == pytest.approx(0.5)
    low, high = binom.ppf([0.025, 0.975], 100, 0.5) / 100  # 0.40 and 0.60
    assert interval.low == pytest.approx(low, abs=0.011) and interval.high == pytest.approx(high, abs=0.011)


def test_the_interval_is_seeded_and_narrows_with_more_images():
    few = average_precision_interval([FOUND, MISSED] * 10, resamples=500, seed=3)
    assert few == average_precision_interval([FOUND, MISSED] * 10, resamples=500, seed=3)
    many = average_precision_interval([FOUND, MISSED] * 200, resamples=500, seed=3)
    assert many.high - many.low < few.high - few.low


@pytest.mark.parametrize("kwargs", [{"confidence": 1.0}, {"confidence": 0.0}, {"resamples": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        average_precision_interval([FOUND], **kwargs)

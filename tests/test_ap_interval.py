"""The bootstrap interval of AP over images, on cases whose distribution is known by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from facedet.evaluation import average_precision, average_precision_difference_interval, average_precision_interval

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


# ------------------------------------------------------------------ the paired difference


def test_the_same_results_differ_by_exactly_zero():
    images = [FOUND, MISSED] * 30
    drop = average_precision_difference_interval(images, images, resamples=300)
    assert drop.value == drop.low == drop.high == 0.0


def test_a_drop_on_a_known_share_of_images_follows_the_binomial_distribution():
    """The reference finds every face; the model misses the faces of 20 images out of 100.

    On a resample of n=100 images with k of the missed ones, AP(reference) = 1 and AP(model) = 1 - k/n,
    so the drop is k/n with k ~ Binomial(100, 0.2): 95% in [0.12, 0.28].  Unpaired, each AP's own
    interval would be the reference's [1, 1] and the model's [0.72, 0.88]: the same width here, but in
    general (both models miss the same hard images) pairing cancels what the images share.
    """
    reference = [FOUND] * 100
    model = [MISSED] * 20 + [FOUND] * 80
    drop = average_precision_difference_interval(reference, model, resamples=4000, seed=2)
    assert drop.value == pytest.approx(0.2)
    low, high = binom.ppf([0.025, 0.975], 100, 0.2) / 100
    assert drop.low == pytest.approx(low, abs=0.011) and drop.high == pytest.approx(high, abs=0.011)


def test_pairing_cancels_what_both_models_share():
    """Both miss the same 50 hard images and the model misses 5 more: its own interval is wide, the drop's narrow."""
    reference = [MISSED] * 50 + [FOUND] * 50
    model = [MISSED] * 55 + [FOUND] * 45
    own = average_precision_interval(model, resamples=2000, seed=4)
    drop = average_precision_difference_interval(reference, model, resamples=2000, seed=4)
    assert drop.value == pytest.approx(0.05)
    assert drop.high - drop.low < (own.high - own.low) / 2
    assert drop.low >= 0.0  # the model never finds more than the reference on any resample


def test_results_on_different_images_are_refused():
    with pytest.raises(ValueError, match="same images"):
        average_precision_difference_interval([FOUND] * 3, [FOUND] * 4)
    two_faces = (FACE, np.array([0.9]), np.vstack([FACE, FACE + 60]), None)
    with pytest.raises(ValueError, match="face counts differ"):
        average_precision_difference_interval([FOUND], [two_faces])

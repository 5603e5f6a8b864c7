"""Morphology metrics (normal = positive) and threshold selection, checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smearsight.errors import InputError
from smearsight.train.morphology.metrics import binary_metrics, roc_auc, roc_curve
from smearsight.train.morphology.threshold import choose_threshold

metrics_sk = pytest.importorskip("sklearn.metrics")

CASES = [
    # labels (1 = abnormal), scores (higher = abnormal), threshold
    ([0, 0, 1, 1, 0, 1, 0, 0], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.7, 0.3], 0.5),
    ([0, 1, 0, 1, 0, 0, 1, 0, 0, 1], [1.0, 1.0, 2.0, 3.0, 0.5, 2.0, 2.0, 0.1, 3.5, 0.2], 2.0),  # ties
    ([0, 0, 0, 1], [0.3, 0.1, 0.2, 0.05], 0.25),  # AUC below 0.5
]


@pytest.mark.parametrize(("labels", "scores", "threshold"), CASES)
def test_binary_metrics_match_sklearn(labels: list[int], scores: list[float], threshold: float) -> None:
    y = np.array(labels)
    s = np.array(scores)
    got = binary_metrics(y, s, threshold)
    y_true_normal = (y == 0).astype(int)  # normal is the positive class
    y_pred_normal = (s < threshold).astype(int)
    assert got["accuracy"] == pytest.approx(metrics_sk.accuracy_score(y_true_normal, y_pred_normal))
    assert got["precision"] == pytest.approx(metrics_sk.precision_score(y_true_normal, y_pred_normal, zero_division=0))
    assert got["recall"] == pytest.approx(metrics_sk.recall_score(y_true_normal, y_pred_normal))
    assert got["f05"] == pytest.approx(metrics_sk.fbeta_score(y_true_normal, y_pred_normal, beta=0.5, zero_division=0))
    assert got["mcc"] == pytest.approx(metrics_sk.matthews_corrcoef(y_true_normal, y_pred_normal))
    specificity = metrics_sk.recall_score(y_true_normal, y_pred_normal, pos_label=0)
    assert got["gmean"] == pytest.approx(math.sqrt(got["recall"] * specificity))
    assert got["auc"] == pytest.approx(metrics_sk.roc_auc_score(y, s))
    assert got["auc"] == pytest.approx(metrics_sk.roc_auc_score(y_true_normal, -s))  # same with normal positive
    assert got["tp"] + got["fp"] + got["tn"] + got["fn"] == len(y)


def test_roc_curve_area_matches_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y * 0.8
    fpr, tpr = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics_sk.roc_auc_score(y, s), abs=1e-9)
    assert roc_auc(y, s) == pytest.approx(metrics_sk.roc_auc_score(y, s))
    assert math.isnan(roc_auc(np.zeros(3, int), np.arange(3.0)))


def test_roc_curve_with_tied_scores_matches_scikit_learn() -> None:
    """Saturated sigmoids tie at exactly 1.0: the curve must step over a tie at once, not draw a staircase."""
    y = np.r_[np.zeros(10, int), np.zeros(40, int), np.ones(50, int)]
    s = np.r_[np.full(10, 0.2), np.full(90, 1.0)]
    rng = np.random.default_rng(3)
    for order in (np.arange(100), rng.permutation(100)):
        fpr, tpr = roc_curve(y[order], s[order])
        ref_fpr, ref_tpr, _ = metrics_sk.roc_curve(y[order], s[order], drop_intermediate=False)
        np.testing.assert_allclose(fpr, ref_fpr)
        np.testing.assert_allclose(tpr, ref_tpr)
        assert np.trapezoid(tpr, fpr) == pytest.approx(metrics_sk.roc_auc_score(y, s))


def test_threshold_maximises_f05_over_all_cuts() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(120) < 0.3).astype(int)
    s = rng.normal(size=120) + 1.5 * y
    choice = choose_threshold(s, y)
    assert choice.method == "max_f05"
    best_brute = max(
        metrics_sk.fbeta_score((y == 0).astype(int), (s < t).astype(int), beta=0.5, zero_division=0)
        for t in np.concatenate([np.unique(s), [s.max() + 1]])
    )
    assert choice.f05 == pytest.approx(best_brute)
    assert binary_metrics(y, s, choice.threshold)["f05"] == pytest.approx(best_brute)
    assert choice.threshold > s.min()  # never flags everything


def test_threshold_fallback_without_abnormal_samples() -> None:
    scores = np.linspace(0.0, 1.0, 101)
    choice = choose_threshold(scores, np.zeros(101, int), fallback_quantile=0.9)
    assert choice.method == "normal_quantile"
    assert "no abnormal" in choice.note
    assert choice.threshold == pytest.approx(0.9)
    assert 0.09 <= np.mean(scores >= choice.threshold) <= 0.10  # at most 1 - quantile of the normals
    constant = choose_threshold(np.full(5, 2.0), np.zeros(5, int))
    assert np.sum(np.full(5, 2.0) >= constant.threshold) == 0  # never flag everything
    tied = np.array([0.0] + [1.0] * 9)  # the quantile falls on a tie: the tied scores stay normal
    assert np.sum(tied >= choose_threshold(tied, np.zeros(10, int)).threshold) == 0


def test_threshold_bad_input() -> None:
    with pytest.raises(InputError, match="no normal"):
        choose_threshold(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(InputError, match="matching"):
        choose_threshold(np.array([0.1, 0.2]), np.array([1]))
    with pytest.raises(InputError, match="NaN"):
        choose_threshold(np.array([0.1, np.nan]), np.array([0, 1]))


def test_scoring_layer_subset_selection() -> None:
    from smearsight.train.morphology.train_loop import best_subset

    rng = np.random.default_rng(2)
    labels = np.array([0] * 30 + [1] * 10)
    per_layer = rng.normal(size=(40, 3))
    per_layer[:, 1] += 3.0 * labels  # only layer 1 separates
    subset, auc = best_subset(per_layer, labels, True, [0, 1, 2])
    assert subset == [1]
    assert auc == pytest.approx(metrics_sk.roc_auc_score(labels, per_layer[:, 1]))
    assert best_subset(per_layer, labels, False, [0, 2])[0] == [0, 2]
    fixed, auc_nan = best_subset(per_layer, np.zeros(40, int), True, [0, 1, 2])
    assert fixed == [0, 1, 2] and math.isnan(auc_nan)


def test_cosine_term_matches_reference_and_stays_in_fp16_range():
    import torch

    from smearsight.train.morphology.losses import layer_terms, unit_channels

    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 48, 5, 5, generator=g) * 400.0  # large activations: squared norms ~ 1e7
    s = torch.randn(3, 48, 5, 5, generator=g) * 300.0
    s[0, :, 0, 0] = 0.0  # a zero vector has cosine 0, so a (1 - cos) of 1
    cos_mean, mse, cos_map = layer_terms(t, s)
    reference = 1.0 - torch.nn.functional.cosine_similarity(t.double(), s.double(), dim=1, eps=1e-12)
    torch.testing.assert_close(cos_map.double(), reference, atol=1e-4, rtol=0)
    assert cos_map[0, 0, 0] == 1.0
    torch.testing.assert_close(mse, ((t - s) ** 2).mean(dim=(1, 2, 3)))
    assert unit_channels(t).abs().max() <= 1.0
    half = layer_terms(t.half(), s.half())[2]  # the same in float16: finite and close
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), cos_map, atol=2e-3, rtol=0)


def test_metrics_on_float32_scores_agree_with_the_chosen_threshold() -> None:
    """Models score in float32; the threshold is a float64 just above a score. The metrics must count the crops
    the way the threshold was chosen (and the runtime compares, in float64), not round it onto a float32 score."""
    tied = np.full(10, 0.3, np.float32)  # valid without abnormal, normal scores tied
    choice = choose_threshold(tied, np.zeros(10, int))
    got = binary_metrics(np.zeros(10, int), tied, choice.threshold)
    assert got["fn"] == 0 and got["tp"] == 10  # the fallback never flags everything
    scores = np.array([0.5, 0.5, 0.5, 0.1], np.float32)
    labels = np.array([0, 0, 1, 0])
    choice = choose_threshold(scores, labels)
    assert binary_metrics(labels, scores, choice.threshold)["f05"] == pytest.approx(choice.f05)


def test_auc_of_nan_scores_is_nan() -> None:
    """NaN scores rank nowhere: the AUC is undefined (NaN), not whatever place the sort gave them (it was 1.0)."""
    assert math.isnan(roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, np.nan, np.nan])))
    assert math.isnan(binary_metrics(np.array([0, 1]), np.array([np.nan, 0.5]), 0.3)["auc"])

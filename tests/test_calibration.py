"""Scoring a removal operator against true deletion (citylib.stages.calibration), on
hand-computed tables."""
import numpy as np
import pandas as pd
import pytest

from citylib.stages import calibration


def table(true_means, est_means, spots=6, spread=0.01, seed=0):
    """Rows of (city, object) pairs whose per-image values scatter a little around the given
    means; cities: 'a' holds the first half of the pairs, 'b' the rest."""
    rng = np.random.default_rng(seed)
    rows = []
    half = len(true_means) // 2
    for k, (t, e) in enumerate(zip(true_means, est_means)):
        city = "a" if k < half else "b"
        for s in range(spots):
            d = spread * (1 if s % 2 else -1)          # symmetric: the means stay exact
            rows.append({"city": city, "object": f"o{k}", "group": f"{city}{s}", "true": t + d, "removed": e + d})
    return pd.DataFrame(rows)


def test_an_operator_equal_to_the_truth_agrees_in_everything():
    t = [-3.0, -2.0, -1.0, -0.5, -2.5, 0.5]
    out = calibration.agreement(table(t, t), "removed")
    assert out["spearman_rho"] == pytest.approx(1.0) and out["rho_ci_low"] == pytest.approx(1.0)
    assert out["mae"] == pytest.approx(0.0, abs=1e-12)
    assert (out["strongest_same"], out["cities"], out["n_pairs"]) == (2, 2, 6)
    assert out["sign_agreement"] == 1.0 and out["signs_checked"] == 6


def test_spearman_mae_sign_and_strongest_on_hand_computed_values():
    t = [-3.0, -2.0, -1.0, 1.0]          # cities a: o0, o1; b: o2, o3
    e = [-2.0, -3.0, -1.0, -0.5]         # ranks 2 1 3 4 against 1 2 3 4: rho = 1 - 6*2/(4*15) = 0.8
    out = calibration.agreement(table(t, e), "removed")
    assert out["spearman_rho"] == pytest.approx(0.8)
    assert out["mae"] == pytest.approx((1 + 1 + 0 + 1.5) / 4)
    assert out["sign_agreement"] == pytest.approx(3 / 4)        # o3: true +1, operator -0.5
    assert out["strongest_same"] == 1                          # a: o0 against o1; b: o2 both


def test_reversed_ranks_give_minus_1_and_its_interval():
    t = [-3.0, -2.0, -1.0, 0.5, 1.0, 2.0]
    out = calibration.agreement(table(t, t[::-1]), "removed")
    assert out["spearman_rho"] == pytest.approx(-1.0) and out["rho_ci_high"] < 0


def test_noise_widens_the_interval_and_pairs_with_few_images_are_left_out():
    t = [-3.0, -2.0, -1.0, -0.5, -2.5, 0.5]
    noisy = table(t, t)
    noisy["removed"] += np.random.default_rng(1).normal(0, 2.0, len(noisy))     # the operator's own noise
    wide = calibration.agreement(noisy, "removed")
    assert wide["rho_ci_low"] < 0.9 < wide["rho_ci_high"] + 1e-9
    df = table(t, t)
    df = df[~((df["object"] == "o0") & (df["group"] != "a0"))]             # o0: one image
    assert calibration.agreement(df, "removed")["n_pairs"] == 5
    few = calibration.agreement(table(t[:2], t[:2]), "removed")        # too few to rank: said, not guessed
    assert few["n_pairs"] == 2 and np.isnan(few["spearman_rho"]) and np.isnan(few["mae"])


def test_the_truths_own_reliability_is_1_without_noise_and_near_0_for_noise_alone():
    t = [-3.0, -2.0, -1.0, -0.5, -2.5, 0.5, -1.5, 0.2]
    assert calibration.agreement(table(t, t, spots=8), "removed")["truth_reliability"] == pytest.approx(1.0)
    noise = table([0.0] * 16, [0.0] * 16, spots=30)
    noise["true"] = np.random.default_rng(0).normal(0, 1, len(noise))
    assert abs(calibration.agreement(noise, "removed")["truth_reliability"]) < 0.3

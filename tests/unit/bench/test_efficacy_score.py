"""The efficacy bench's judge: the attribute classifier, the prompt score and the Fréchet distance."""

from __future__ import annotations

import pytest
import torch

from dydit_scale.bench.efficacy_data import ATTRIBUTES, make_data
from dydit_scale.bench.efficacy_score import (FEATURES, AttributeClassifier, features, frechet_distance, predict,
                                              prompt_score, train_classifier)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small convolutions on a busy machine run far faster on one thread than on several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    data = make_data(2000, 256, 32, seed=0)
    classifier, info = train_classifier(data, steps=200, batch=64, seed=0)
    return data, classifier, info


def _with_covariance(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """n rows whose sample mean is `mean` and unbiased sample covariance exactly diag(std²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(dim=0))
    return mean + q * std * (n - 1) ** 0.5


def test_frechet_identical_sets_is_zero() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frechet_matches_diagonal_closed_form() -> None:
    mu_a, mu_b, std_a, std_b = torch.tensor([[0.0, 1.0, -2.0, 0.5], [1.0, 1.0, 0.0, -0.5], [1.0, 2.0, 0.5, 1.5],
                                             [1.0, 0.5, 0.5, 3.0]], dtype=torch.float64)
    a, b = _with_covariance(50, mu_a, std_a, 1), _with_covariance(70, mu_b, std_b, 2)
    expected = float((mu_a - mu_b).square().sum() + (std_a - std_b).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    same_spread = _with_covariance(60, mu_b, std_a, 3)
    assert frechet_distance(a, same_spread) == pytest.approx(float((mu_a - mu_b).square().sum()), rel=1e-9)


def test_frechet_general_case_and_symmetry() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr((Σa^½ Σb Σa^½)^½) = Σ √eig(Σa Σb), whose eigenvalues are real and non-negative
    cross = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    expected = float((a.mean(0) - b.mean(0)).square().sum() + torch.trace(ca + cb) - 2 * cross)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-6)


@pytest.mark.parametrize("a, b", [(torch.zeros(1, 4), torch.zeros(5, 4)), (torch.zeros(5, 4), torch.zeros(1, 4)),
                                  (torch.zeros(5, 4), torch.zeros(5, 3)), (torch.zeros(5), torch.zeros(5))])
def test_frechet_rejects_bad_shapes(a: torch.Tensor, b: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(a, b)


def test_classifier_shapes_for_other_sizes() -> None:
    model = AttributeClassifier().eval()
    for side in (16, 32):
        x = torch.zeros(2, 3, side, side)
        assert model.features(x).shape == (2, FEATURES)
        assert [tuple(t.shape) for t in model(x)] == [(2, len(v)) for v in ATTRIBUTES.values()]


def test_training_is_deterministic_in_seed() -> None:
    data = make_data(64, 8, 16, seed=1)
    first, second = (train_classifier(data, steps=3, batch=8, seed=5)[0] for _ in range(2))
    third = train_classifier(data, steps=3, batch=8, seed=6)[0]
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.heads[0].weight, third.heads[0].weight)


def test_classifier_reads_held_out_images(trained) -> None:
    data, classifier, info = trained
    assert not classifier.training
    assert info["accuracy"] >= 0.9 and info["steps"] == 200 and info["seconds"] > 0
    assert set(info["per_attribute"]) == set(ATTRIBUTES) and min(info["per_attribute"].values()) >= 0.9
    labels = predict(classifier, data.held_x, batch=100)
    assert labels.dtype == torch.long and labels.shape == data.held_y.shape
    loud = data.held_x * 3
    assert torch.equal(predict(classifier, loud), predict(classifier, loud.clamp(-1, 1)))


def test_prompt_score_follows_prompts(trained) -> None:
    data, classifier, _ = trained
    assert prompt_score(classifier, data.held_x, data.held_y) >= 0.9
    assert prompt_score(classifier, data.held_x, data.held_y.roll(1, dims=0)) < 0.3


def test_features_separate_real_from_noise(trained) -> None:
    data, classifier, _ = trained
    real = features(classifier, data.held_x, batch=100)
    assert real.shape == (len(data.held_x), FEATURES) and real.dtype == torch.float32
    half = len(real) // 2
    noise = features(classifier, torch.randn(half, *data.held_x.shape[1:], generator=torch.Generator().manual_seed(0)))
    real_vs_real = frechet_distance(real[:half], real[half:])
    assert real_vs_real < frechet_distance(real[:half], noise) / 5

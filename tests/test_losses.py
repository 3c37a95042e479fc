"""FocalLoss, resolve_alpha, validate_gamma and build_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from covidct.errors import ConfigError
from covidct.models.losses import CrossEntropyLoss, FocalLoss, resolve_alpha, validate_gamma

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]]
TARGET = [0, 2, 1, 0]


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_matches_hand_computation() -> None:
    alpha = [0.25, 0.5, 0.25]
    expected = 0.0
    for row, t in zip(LOGITS, TARGET, strict=True):
        pt = _softmax(row)[t]
        expected += -alpha[t] * (1 - pt) ** 2 * math.log(pt)
    expected /= len(TARGET)
    loss = FocalLoss(gamma=2, alpha=alpha)(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3) * 5, torch.randint(0, 3, (16,))
    logits[0] = torch.tensor([100.0, -100.0, -100.0])  # p_t == 1 exactly
    target[0] = 0
    loss = FocalLoss(gamma=0, alpha=None)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_larger_gamma_down_weights_easy_examples() -> None:
    easy, hard = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.5, 0.0]])
    target = torch.tensor([0])
    ratios = []
    for gamma in (0.0, 0.5, 1.0, 2.0, 5.0):
        loss = FocalLoss(gamma=gamma)
        ratios.append((loss(easy, target) / loss(hard, target)).item())
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False))


def test_scalar_alpha_scales_the_loss() -> None:
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    plain = FocalLoss(gamma=2)(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=2, alpha=0.25)(logits, target), 0.25 * plain)


def test_ignore_index() -> None:
    logits = torch.tensor(LOGITS)
    loss = FocalLoss(gamma=2, ignore_index=-1)
    masked = loss(logits, torch.tensor([0, -1, 1, -1]))
    torch.testing.assert_close(masked, loss(logits[[0, 2]], torch.tensor([0, 1])))

    all_ignored = logits.clone().requires_grad_()
    zero = loss(all_ignored, torch.full((4,), -1))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(all_ignored.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_gradient_finite_for_extreme_logits(gamma: float) -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, 0.0, 1e4]], requires_grad=True)
    loss = FocalLoss(gamma=gamma, alpha=[0.2, 0.3, 0.5])(logits, torch.tensor([0, 0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_alpha_is_a_buffer_that_follows_dtype_and_device() -> None:
    loss = FocalLoss(alpha=[0.2, 0.3, 0.5])
    assert "alpha" in dict(loss.named_buffers())
    assert "alpha" not in loss.state_dict()  # checkpoints do not depend on the loss config
    assert loss.to(torch.float64).alpha.dtype == torch.float64


def test_auto_alpha_is_normalised_inverse_frequency() -> None:
    assert resolve_alpha("auto", [100, 50, 10], 3) == pytest.approx([1 / 13, 2 / 13, 10 / 13])
    loss = FocalLoss(gamma=2.0, alpha="auto")
    with pytest.raises(RuntimeError, match="loss.alpha=auto is not fitted"):
        loss(torch.tensor(LOGITS), torch.tensor(TARGET))  # never silently unweighted
    loss.fit_class_counts([100, 50, 10])
    torch.testing.assert_close(loss.alpha, torch.tensor([1 / 13, 2 / 13, 10 / 13]))
    with pytest.raises(ConfigError, match="needs every class in the training split"):
        loss.fit_class_counts([100, 0, 10])


def test_resolve_alpha_accepts_valid_values() -> None:
    assert resolve_alpha(None, None, 3) is None
    assert resolve_alpha(0.25, None, 3) == 0.25
    assert resolve_alpha(1, None, 3) == 1.0
    assert resolve_alpha(OmegaConf.create([0.2, 0.3, 0.5]), None, 3) == [0.2, 0.3, 0.5]
    assert resolve_alpha((0, 1, 0.5), None, 3) == [0.0, 1.0, 0.5]


@pytest.mark.parametrize(
    ("alpha", "counts", "fragment"),
    [
        (1.5, None, "loss.alpha must be in [0, 1]"),
        (-0.1, None, "loss.alpha"),
        ([0.2, 0.8], None, "loss.alpha has 2 values but there are 3 classes (COVID-19, CAP, Normal)"),
        ([0.2, 0.3, 2.0], None, "loss.alpha[2]"),
        ("balanced", None, "loss.alpha"),
        (["a", 0.3, 0.5], None, "loss.alpha[0]"),
        (float("nan"), None, "loss.alpha"),
        (True, None, "loss.alpha"),
        ({"a": 1}, None, "loss.alpha"),
        ("auto", None, "loss.alpha=auto needs the class counts"),
        ("auto", [100, 0, 10], "needs every class in the training split"),
        ("auto", [100, 10], "loss.alpha=auto got 2 class counts"),
    ],
)
def test_resolve_alpha_rejects_invalid(alpha: object, counts: list[int] | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_alpha(alpha, counts, 3)
    assert fragment in str(info.value)


def test_wrong_length_message_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="give one weight per class, a single number, null or auto"):
        resolve_alpha([0.2, 0.8], None, 3)


@pytest.mark.parametrize("gamma", [-1, -0.5, "x", float("inf"), None, False])
def test_invalid_gamma(gamma: object) -> None:
    with pytest.raises(ConfigError, match="loss.gamma"):
        validate_gamma(gamma)
    with pytest.raises(ConfigError, match="loss.gamma"):
        FocalLoss(gamma=gamma)  # type: ignore[arg-type]


def test_negative_gamma_message() -> None:
    with pytest.raises(ConfigError, match=r"loss.gamma must be >= 0, got -1"):
        validate_gamma(-1)
    assert validate_gamma(0) == 0.0
    assert validate_gamma("2") == 2.0


def test_the_loss_configs_build_the_losses_the_model_completes(tmp_path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    focal = instantiate(compose_train(tmp_path, ["loss.alpha=[0.2,0.3,0.5]"]).loss)(num_classes=3, ignore_index=-1)
    assert isinstance(focal, FocalLoss) and focal.gamma == 2.0 and focal.ignore_index == -1
    torch.testing.assert_close(focal.alpha, torch.tensor([0.2, 0.3, 0.5]))
    ce_config = compose_train(tmp_path, ["loss=ce"]).loss
    assert "gamma" not in ce_config and "alpha" not in ce_config  # nothing unused
    ce = instantiate(ce_config)(num_classes=3, ignore_index=-1)
    assert isinstance(ce, CrossEntropyLoss) and isinstance(ce, torch.nn.CrossEntropyLoss)
    assert ce.weight is None and ce.ignore_index == -1
    ce.fit_class_counts([1, 2, 3])  # nothing to fit
    torch.testing.assert_close(
        ce(torch.tensor(LOGITS), torch.tensor(TARGET)),
        torch.nn.functional.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGET)),
    )
    with pytest.raises(ConfigError, match="loss.gamma must be a number"):
        instantiate(compose_train(tmp_path, ["loss.gamma=strong"]).loss)(num_classes=3, ignore_index=-1)

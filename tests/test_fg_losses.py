"""Fine-grained guidance loss terms (Eq. 1-5) and GradNorm, each against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from projects.fg_guidance.gradnorm import (
    GradNorm,
    gradnorm_loss,
    gradnorm_targets,
    loss_ratios,
    renormalise,
    task_gradient_norms,
)
from projects.fg_guidance.losses import (
    contrastive_loss,
    detail_alignment_loss,
    environment_invariance_loss,
    temporal_consistency_loss,
    total_loss,
)


def test_contrastive_loss_matches_hadsell_by_hand():
    # D = 5 for both pairs (a 3-4-5 triangle); same pair: 1/2 * 25; different pair with m = 6: 1/2 * (6 - 5)^2.
    z_a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z_b = torch.tensor([[3.0, 4.0], [4.0, 5.0]])
    assert contrastive_loss(z_a, z_b, torch.tensor([1, 0]), margin=6.0).item() == pytest.approx(
        (12.5 + 0.5) / 2
    )
    # beyond the margin a different pair costs nothing
    assert contrastive_loss(z_a[1:], z_b[1:], torch.tensor([0]), margin=2.0).item() == 0.0
    # identical embeddings: a same pair costs 0, a different pair m^2 / 2, with a finite gradient
    z = torch.ones(1, 3, requires_grad=True)
    loss = contrastive_loss(z, z.detach().clone(), torch.tensor([0]), margin=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.125, abs=1e-5) and torch.isfinite(z.grad).all()


def test_detail_alignment_is_infonce_over_each_patch_row_by_hand():
    # S = patches @ tokens.T is asymmetric on purpose:
    #   [[0.5, 1, 0],
    #    [0,   2, 0],
    #    [0.5, 2, 3]]
    # so the softmax over tokens j for each patch k (Eq. 3) and the one over patches for each token (the wrong
    # axis) give different losses, and an implementation on the transposed matrix fails here.
    patches = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    tokens = torch.tensor([[0.5, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    similarity = [[0.5, 1.0, 0.0], [0.0, 2.0, 0.0], [0.5, 2.0, 3.0]]
    tau = 0.5

    def naive(s):  # -1/K sum_k log(exp(S_kk / tau) / sum_j exp(S_kj / tau)), one row at a time
        total = 0.0
        for k in range(3):
            total -= s[k][k] / tau - math.log(sum(math.exp(s[k][j] / tau) for j in range(3)))
        return total / 3

    expected = naive(similarity)
    wrong_axis = naive([list(col) for col in zip(*similarity)])
    assert abs(expected - wrong_axis) > 0.01  # the two axes really differ for this matrix
    assert detail_alignment_loss(patches, tokens, tau).item() == pytest.approx(expected, rel=1e-6)
    # perfectly matched parts at a low temperature cost almost nothing; swapped parts cost a lot
    eye = torch.eye(3)
    assert detail_alignment_loss(eye, eye, 0.01).item() < 1e-6
    assert detail_alignment_loss(eye, eye.flip(0), 0.01).item() > 50


def test_temporal_consistency_plain_and_masked_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z_aged = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    assert temporal_consistency_loss(z, z_aged).item() == pytest.approx((5.0 + 0.0) / 2)
    # patch version: image 0 has two patches with squared distances 4 and 1, weighted 0.25 / 0.75;
    # image 1 has no masked patch and is left out of the mean.
    zp = torch.zeros(2, 2, 1)
    zp_aged = torch.tensor([[[2.0], [1.0]], [[3.0], [3.0]]])
    weights = torch.tensor([[0.25, 0.75], [0.0, 0.0]])
    assert temporal_consistency_loss(zp, zp_aged, weights).item() == pytest.approx(0.25 * 4 + 0.75 * 1)
    assert temporal_consistency_loss(zp, zp_aged, torch.zeros(2, 2)).item() == 0.0


def test_environment_invariance_is_the_mean_over_environments_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    z_env = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 3.0], [1.0, 2.0]]])  # E = 2 environments
    # distances^2: env 0 -> 1, 0; env 1 -> 9, 4; mean over the 4 (e, image) pairs
    assert environment_invariance_loss(z, z_env).item() == pytest.approx((1 + 0 + 9 + 4) / 4)
    with pytest.raises(ValueError, match="z_env"):
        environment_invariance_loss(z, z)


def test_total_loss_is_the_weighted_sum_of_eq_1():
    losses = torch.tensor([2.0, 1.0, 4.0, 8.0])
    lambdas = torch.tensor([1.0, 1.5, 0.35, 0.35])
    assert total_loss(losses, lambdas).item() == pytest.approx(2 + 1.5 + 1.4 + 2.8)


def test_bad_loss_arguments_are_clear():
    with pytest.raises(ValueError, match="margin"):
        contrastive_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), margin=0)
    with pytest.raises(ValueError, match="tau"):
        detail_alignment_loss(torch.eye(2), torch.eye(2), tau=0)
    with pytest.raises(ValueError, match=r"\(K, d\)"):
        detail_alignment_loss(torch.eye(2), torch.eye(3), tau=1)


# -- GradNorm ------------------------------------------------------------------------------------------------


def _gradnorm_by_hand(w, norms, losses, initial, alpha, lr, total, active=None):
    """Chen et al. 2018 written out with plain floats: G, r, targets, dL_grad/dw, SGD, clamp, renormalise.
    Terms not in ``active`` take no part in the means and get no gradient."""
    active = active or [True] * len(w)
    on = [i for i in range(len(w)) if active[i]]
    g = [wi * ni for wi, ni in zip(w, norms)]
    rates = {i: losses[i] / initial[i] for i in on}
    mean_rate = sum(rates.values()) / len(on)
    r = [rates[i] / mean_rate if i in rates else 1.0 for i in range(len(w))]
    mean_g = sum(g[i] for i in on) / len(on)
    targets = [mean_g * ri**alpha for ri in r]
    l_grad = sum(abs(g[i] - targets[i]) for i in on)
    dw = [norms[i] * (1.0 if g[i] > targets[i] else -1.0) if active[i] else 0.0 for i in range(len(w))]
    new = [max(wi - lr * di, 1e-3) for wi, di in zip(w, dw)]
    return l_grad, [x * total / sum(new) for x in new], r


def test_gradnorm_update_matches_a_hand_computation():
    initial = [1.0, 1.5, 0.35, 0.35]
    norms = [2.0, 1.0, 4.0, 0.5]
    losses = [1.0, 2.0, 0.5, 1.0]
    gradnorm = GradNorm(initial, alpha=1.5, lr=0.1)
    # the first step's losses become L_i(0); use them as the reference of the hand computation
    logged = gradnorm.step(torch.tensor(losses), torch.tensor(norms))
    l_grad, expected, _ = _gradnorm_by_hand(initial, norms, losses, losses, 1.5, 0.1, 3.2)
    assert logged["gradnorm_loss"].item() == pytest.approx(l_grad, rel=1e-6)
    np.testing.assert_allclose(gradnorm.lambdas.numpy(), expected, rtol=1e-6)
    assert gradnorm.lambdas.sum().item() == pytest.approx(3.2)

    # second step: other losses, the reference is the EMA of the two steps
    later = [0.5, 2.5, 0.5, 0.25]
    reference = [0.8 * a + 0.2 * b for a, b in zip(losses, later)]
    before = gradnorm.lambdas.tolist()
    logged = gradnorm.step(torch.tensor(later), torch.tensor(norms))
    l_grad, expected, _ = _gradnorm_by_hand(before, norms, later, reference, 1.5, 0.1, 3.2)
    np.testing.assert_allclose(gradnorm.initial_losses.numpy(), reference, rtol=1e-6)
    np.testing.assert_allclose(gradnorm.lambdas.numpy(), expected, rtol=1e-6)


def test_gradnorm_reference_starts_when_a_term_first_becomes_active():
    # the detail term (index 1) has no pairs on the first two batches: its L(0) must start at its first active
    # loss (2.0), then follow the EMA; seeding it with the inactive 0 would give 0.4 and inflate r_det
    initial, norms = [1.0, 1.5, 0.35, 0.35], [2.0, 1.0, 4.0, 0.5]
    steps = [
        ([1.0, 0.0, 0.5, 1.0], [True, False, True, True]),
        ([0.8, 0.0, 0.4, 0.9], None),  # active inferred: a zero loss is inactive
        ([0.9, 2.0, 0.5, 0.8], [True, True, True, True]),
        ([0.7, 1.0, 0.3, 0.6], [True, True, True, True]),
    ]
    gradnorm = GradNorm(initial, alpha=1.5, lr=0.1, reference_steps=10, reference_momentum=0.8)
    reference, count, w = [0.0] * 4, [0] * 4, list(initial)
    for losses, active in steps:
        on = active or [x > 0 for x in losses]
        step_norms = [n if a else 0.0 for n, a in zip(norms, on)]  # an inactive term has no gradient
        for i in range(4):  # the naive per-term reference
            if on[i]:
                reference[i] = losses[i] if count[i] == 0 else 0.8 * reference[i] + 0.2 * losses[i]
                count[i] += 1
        l_grad, w, ratios = _gradnorm_by_hand(w, step_norms, losses, reference, 1.5, 0.1, 3.2, on)
        logged = gradnorm.step(
            torch.tensor(losses),
            torch.tensor(step_norms),
            None if active is None else torch.tensor(active),
        )
        np.testing.assert_allclose(gradnorm.initial_losses.numpy(), reference, rtol=1e-6)
        np.testing.assert_allclose(logged["ratio"].numpy(), ratios, rtol=1e-6)
        assert logged["gradnorm_loss"].item() == pytest.approx(l_grad, rel=1e-6)
        np.testing.assert_allclose(gradnorm.lambdas.numpy(), w, rtol=1e-6)
    assert gradnorm.initial_losses[1].item() == pytest.approx(0.8 * 2.0 + 0.2 * 1.0)
    assert gradnorm.reference_counts.tolist() == [4, 2, 4, 4]


def test_gradnorm_reference_freezes_per_term_and_old_checkpoints_load():
    gradnorm = GradNorm([1.0, 1.0], reference_steps=2, reference_momentum=0.5)
    gradnorm.step(torch.tensor([4.0, 0.0]), torch.ones(2))
    gradnorm.step(torch.tensor([2.0, 8.0]), torch.ones(2))
    gradnorm.step(torch.tensor([1.0, 4.0]), torch.ones(2))  # term 0 frozen after 2 active steps, term 1 not
    gradnorm.step(torch.tensor([1.0, 1.0]), torch.ones(2))
    np.testing.assert_allclose(gradnorm.initial_losses.numpy(), [3.0, 6.0])
    # a checkpoint written before per-term counts: terms with a reference counted every step
    state = {k: v for k, v in gradnorm.state_dict().items() if k != "reference_counts"}
    restored = GradNorm([1.0, 1.0], reference_steps=2)
    restored.load_state_dict(state)
    assert restored.reference_counts.tolist() == [2, 2]


def test_gradnorm_pieces_by_hand():
    ratios = loss_ratios(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 0.0]))
    # inverse training rates 2 and 1 (mean 3/2); the never-active task is left out of the mean, ratio 1
    np.testing.assert_allclose(ratios.numpy(), [4 / 3, 2 / 3, 1.0], rtol=1e-6)
    # a task inactive on this step is left out too
    ratios = loss_ratios(torch.tensor([2.0, 1.0, 0.0]), torch.ones(3), torch.tensor([True, True, False]))
    np.testing.assert_allclose(ratios.numpy(), [4 / 3, 2 / 3, 1.0], rtol=1e-6)
    targets = gradnorm_targets(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), torch.ones(2), alpha=2.0)
    np.testing.assert_allclose(targets.numpy(), [2.0, 2.0])
    assert gradnorm_loss(torch.tensor([1.0, 3.0]), targets).item() == 2.0
    np.testing.assert_allclose(
        renormalise(torch.tensor([-1.0, 1.0]), 2.0, 0.001).numpy(), [0.002 / 1.001, 2 / 1.001]
    )


def test_gradnorm_with_alpha_zero_equalises_the_weighted_gradient_norms():
    gradnorm = GradNorm([1.0, 1.0], alpha=0.0, lr=0.002)
    norms = torch.tensor([1.0, 4.0])
    for _ in range(1000):
        gradnorm.step(torch.tensor([1.0, 1.0]), norms)
    w = gradnorm.lambdas
    assert (w * norms)[0].item() == pytest.approx((w * norms)[1].item(), rel=0.05)
    np.testing.assert_allclose(w.numpy(), [1.6, 0.4], atol=0.03)


def test_gradnorm_disabled_keeps_the_lambdas_fixed():
    gradnorm = GradNorm([1.0, 1.5], enabled=False)
    gradnorm.step(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 9.0]))
    assert gradnorm.lambdas.tolist() == [1.0, 1.5]


def test_task_gradient_norms_never_touch_network_gradients():
    net = torch.nn.Linear(3, 3)
    image = net(torch.ones(2, 3))
    losses = [image.pow(2).sum(), (2 * image).sum(), torch.tensor(0.7)]
    norms = task_gradient_norms(losses, [image])
    expected_first = (2 * image.detach()).norm()
    assert norms[0].item() == pytest.approx(expected_first.item(), rel=1e-6)
    assert norms[1].item() == pytest.approx(2 * math.sqrt(6), rel=1e-6)
    assert norms[2].item() == 0.0
    assert all(p.grad is None for p in net.parameters())
    GradNorm([1.0, 1.0, 1.0]).step(torch.stack([loss.detach() for loss in losses]), norms)
    assert all(p.grad is None for p in net.parameters())

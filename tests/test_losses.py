"""Golden-value tests for rmsnet.losses against independent references.

References are torchvision / torch.nn.functional where a library computes the same quantity,
direct transcriptions of the papers' (or the authors' code's) formulas written out here, numpy
transcriptions, and small cases worked out by hand. None of them calls rmsnet.losses.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from rmsnet.losses import (
    attention_map,
    attention_transfer_loss,
    focal_loss,
    hint_loss,
    kd_loss,
    make_hint_adapters,
    similarity_preserving_loss,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0, requires_grad=False):
    x = torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale
    return x.requires_grad_(requires_grad)


# =========================================================================== focal loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 1.0), (-1, 3.5), (0.0, 2.0)])
def test_multilabel_focal_equals_torchvision_sigmoid_focal_loss(alpha, gamma, reduction):
    logits = _randn(6, 14, seed=1, scale=3.0)
    targets = (torch.rand(6, 14, generator=_gen(2)) < 0.3).to(F64)
    got = focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_multilabel_focal_alpha_none_disables_weighting_like_torchvision_minus_one():
    logits = _randn(4, 5, seed=3)
    targets = (torch.rand(4, 5, generator=_gen(4)) < 0.5).to(F64)
    got = focal_loss(logits, targets, alpha=None, gamma=2.0)
    ref = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="mean")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_multilabel_focal_per_class_alpha_equals_torchvision_applied_class_by_class():
    logits = _randn(5, 4, seed=5, scale=2.0)
    targets = (torch.rand(5, 4, generator=_gen(6)) < 0.4).to(F64)
    alpha = [0.1, 0.5, 0.75, 0.95]
    got = focal_loss(logits, targets, alpha=alpha, gamma=1.5, reduction="none")
    ref = torch.stack(
        [sigmoid_focal_loss(logits[:, c], targets[:, c], alpha=a, gamma=1.5) for c, a in enumerate(alpha)], 1
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    # A tensor works the same as a list.
    torch.testing.assert_close(
        focal_loss(logits, targets, alpha=torch.tensor(alpha), gamma=1.5, reduction="none"), ref
    )


def test_multilabel_focal_is_finite_for_saturated_logits_in_float32():
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss = focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Two confidently wrong elements each cost about alpha_t * 100.
    assert loss.item() == pytest.approx(0.75 * 100 + 0.25 * 100, rel=1e-4)


@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_focal_with_gamma0_and_no_alpha_equals_cross_entropy(one_hot):
    logits = _randn(7, 6, seed=7, scale=2.0)
    idx = torch.randint(0, 6, (7,), generator=_gen(8))
    targets = F.one_hot(idx, 6).to(F64) if one_hot else idx
    for reduction in ("mean", "sum", "none"):
        got = focal_loss(logits, targets, alpha=None, gamma=0.0, multilabel=False, reduction=reduction)
        torch.testing.assert_close(got, F.cross_entropy(logits, idx, reduction=reduction), rtol=1e-12, atol=0)


def test_softmax_focal_with_gamma0_and_per_class_alpha_equals_weighted_cross_entropy_per_sample():
    logits = _randn(7, 3, seed=9)
    idx = torch.randint(0, 3, (7,), generator=_gen(10))
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=F64)
    got = focal_loss(logits, idx, alpha=weight, gamma=0.0, multilabel=False, reduction="none")
    ref = F.cross_entropy(logits, idx, weight=weight, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_softmax_focal_matches_hand_computed_two_sample_case():
    # softmax(log[1,2,1]) = [.25,.5,.25], true class 1 -> p_t = 1/2;
    # softmax(log[1,1,2]) = [.25,.25,.5], true class 0 -> p_t = 1/4.
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]], dtype=F64))
    idx = torch.tensor([1, 0])
    ln2 = math.log(2.0)
    per_sample = [0.5**2 * ln2, 0.75**2 * 2 * ln2]  # (1-p_t)^2 * (-log p_t)
    got = focal_loss(logits, idx, alpha=None, gamma=2.0, multilabel=False, reduction="none")
    torch.testing.assert_close(got, torch.tensor(per_sample, dtype=F64), rtol=1e-12, atol=0)

    alpha = [0.1, 0.2, 0.7]  # sample 0 is class 1 (0.2), sample 1 is class 0 (0.1)
    expected_mean = (0.2 * per_sample[0] + 0.1 * per_sample[1]) / 2
    got = focal_loss(logits, idx, alpha=alpha, gamma=2.0, multilabel=False)
    assert got.item() == pytest.approx(expected_mean, rel=1e-12)
    got_one_hot = focal_loss(logits, F.one_hot(idx, 3).to(F64), alpha=alpha, gamma=2.0, multilabel=False)
    assert got_one_hot.item() == pytest.approx(expected_mean, rel=1e-12)

    # A scalar alpha is a constant factor in the softmax form.
    got = focal_loss(logits, idx, alpha=0.25, gamma=2.0, multilabel=False, reduction="sum")
    assert got.item() == pytest.approx(0.25 * sum(per_sample), rel=1e-12)


def test_focal_rejects_bad_reduction_alpha_and_target_shapes():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, torch.zeros(2, 3), reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, torch.zeros(2, 3), alpha=[0.1, 0.2])
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, torch.zeros(2, 3), alpha=1.5)
    with pytest.raises(ValueError, match="targets"):
        focal_loss(logits, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="targets"):
        focal_loss(logits, torch.zeros(2), multilabel=False)  # float indices


# =========================================================================== logit KD


def _bce_kd_reference(s, t, T):
    return T**2 * F.binary_cross_entropy_with_logits(s / T, torch.sigmoid(t / T), reduction="mean")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_multilabel_kd_is_zero_when_student_equals_teacher(dtype):
    z = torch.randn(8, 14, generator=_gen(11), dtype=dtype) * 5
    for T in (1.0, 4.0):
        loss = kd_loss(z.clone(), z.clone(), temperature=T, multilabel=True)
        assert abs(loss.item()) <= 1e-7


def test_multilabel_kd_is_non_negative_and_positive_when_logits_differ():
    for seed in range(20):
        s = _randn(4, 14, seed=100 + seed, scale=4.0)
        t = _randn(4, 14, seed=200 + seed, scale=4.0)
        assert kd_loss(s, t, temperature=2.0).item() > 0


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_multilabel_kd_gradient_equals_gradient_of_t2_bce_with_soft_teacher_targets(T):
    s = _randn(5, 14, seed=12, scale=3.0, requires_grad=True)
    t = _randn(5, 14, seed=13, scale=3.0)
    kd_loss(s, t, temperature=T, multilabel=True).backward()
    got = s.grad.clone()
    s.grad = None
    _bce_kd_reference(s, t, T).backward()
    torch.testing.assert_close(got, s.grad, rtol=1e-10, atol=1e-14)


def test_multilabel_kd_equals_bce_minus_teacher_entropy():
    s, t, T = _randn(6, 14, seed=14, scale=3.0), _randn(6, 14, seed=15, scale=3.0), 3.0
    p_t = torch.sigmoid(t / T)
    entropy = -(p_t * torch.log(p_t) + (1 - p_t) * torch.log(1 - p_t)).mean()
    expected = _bce_kd_reference(s, t, T) - T**2 * entropy
    torch.testing.assert_close(kd_loss(s, t, temperature=T), expected, rtol=1e-10, atol=1e-12)


def test_multilabel_kd_is_finite_for_saturated_logits_in_float32():
    s = torch.tensor([[50.0, -50.0]], requires_grad=True)
    t = torch.tensor([[-50.0, -50.0]])
    loss = kd_loss(s, t, temperature=1.0)
    loss.backward()
    # Element 0: KL(Bern(~0) || Bern(~1)) = -log(1 - sigmoid(50)) ~ 50; element 1: 0. Mean ~ 25.
    assert loss.item() == pytest.approx(25.0, rel=1e-5)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_softmax_kd_equals_t2_batchmean_kl_div(T):
    s, t = _randn(6, 10, seed=16, scale=3.0), _randn(6, 10, seed=17, scale=3.0)
    ref = T**2 * F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    torch.testing.assert_close(kd_loss(s, t, temperature=T, multilabel=False), ref, rtol=1e-12, atol=1e-15)


def test_softmax_kd_equals_numpy_transcription_of_hinton_kl():
    s, t, T = _randn(5, 6, seed=18, scale=2.0), _randn(5, 6, seed=19, scale=2.0), 4.0

    def np_softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_s, p_t = np_softmax(s.numpy() / T), np_softmax(t.numpy() / T)
    expected = T**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    assert kd_loss(s, t, temperature=T, multilabel=False).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("multilabel", [True, False])
def test_kd_gives_teacher_logits_no_gradient(multilabel):
    s = _randn(3, 4, seed=20, requires_grad=True)
    t = _randn(3, 4, seed=21, requires_grad=True)
    kd_loss(s, t, multilabel=multilabel).backward()
    assert s.grad is not None and t.grad is None


# =========================================================================== attention transfer


def _at_authors(x):
    # Transcribed from szagoruyko/attention-transfer utils.py (at / at_loss).
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def _at_loss_authors(x, y):
    return (_at_authors(x) - _at_authors(y)).pow(2).mean()


def test_attention_map_equals_authors_formula_and_has_unit_rows():
    x = _randn(3, 5, 4, 4, seed=22)
    got = attention_map(x)
    torch.testing.assert_close(got, _at_authors(x), rtol=1e-12, atol=0)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3, dtype=F64))


def test_attention_transfer_equals_authors_code_summed_over_two_levels_with_different_channels():
    student = [_randn(4, 8, 16, 16, seed=23), _randn(4, 16, 8, 8, seed=24)]
    teacher = [_randn(4, 32, 16, 16, seed=25), _randn(4, 64, 8, 8, seed=26)]
    expected = _at_loss_authors(student[0], teacher[0]) + _at_loss_authors(student[1], teacher[1])
    torch.testing.assert_close(attention_transfer_loss(student, teacher), expected, rtol=1e-12, atol=0)


def test_attention_transfer_pools_larger_student_map_to_teacher_size_before_attention():
    fs, ft = _randn(2, 6, 32, 32, seed=27), _randn(2, 12, 16, 16, seed=28)
    expected = _at_loss_authors(F.avg_pool2d(fs, 2), ft)  # 32 -> 16 by 2x2 windows
    torch.testing.assert_close(attention_transfer_loss([fs], [ft]), expected, rtol=1e-12, atol=0)
    # Pooling the attention map instead of the features would give a different number.
    wrong = (F.avg_pool2d(_at_authors(fs).view(2, 1, 32, 32), 2).flatten(1) - _at_authors(ft)).pow(2).mean()
    assert not torch.isclose(expected, wrong, rtol=1e-3)


def test_attention_transfer_pools_larger_teacher_map_to_student_size():
    fs, ft = _randn(2, 6, 14, 14, seed=29), _randn(2, 12, 28, 28, seed=30)
    expected = _at_loss_authors(fs, F.avg_pool2d(ft, 2))
    torch.testing.assert_close(attention_transfer_loss([fs], [ft]), expected, rtol=1e-12, atol=0)


def test_attention_transfer_is_zero_for_identical_maps():
    fs = _randn(2, 4, 8, 8, seed=31)
    assert attention_transfer_loss([fs], [fs.clone()]).item() == 0.0


def test_attention_transfer_gives_teacher_features_no_gradient():
    fs = _randn(2, 4, 8, 8, seed=32, requires_grad=True)
    ft = _randn(2, 6, 8, 8, seed=33, requires_grad=True)
    attention_transfer_loss([fs], [ft]).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None


def test_attention_transfer_rejects_unpaired_levels():
    with pytest.raises(ValueError, match="levels"):
        attention_transfer_loss([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)] * 2)


# =========================================================================== similarity preserving


def _sp_numpy(fs, ft, row_norm_ord=2):
    """Tung & Mori eq. 2-4 written with explicit loops."""
    b = fs.shape[0]
    qs, qt = fs.reshape(b, -1), ft.reshape(b, -1)
    total = 0.0
    for i in range(b):
        gs_row = np.array([qs[i] @ qs[j] for j in range(b)])
        gt_row = np.array([qt[i] @ qt[j] for j in range(b)])
        gs_row = gs_row / np.linalg.norm(gs_row, ord=row_norm_ord)
        gt_row = gt_row / np.linalg.norm(gt_row, ord=row_norm_ord)
        total += np.sum((gs_row - gt_row) ** 2)
    return total / b**2


def test_similarity_preserving_matches_hand_computed_three_sample_case():
    # Student rows [1,0],[0,1],[1,1] -> G_s = [[1,0,1],[0,1,1],[1,1,2]]; teacher rows one-hot -> G_t = I.
    # Row-L2-normalised squared differences: 2-sqrt2, 2-sqrt2, 2-4/sqrt6; divided by b^2 = 9.
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64).view(3, 2, 1, 1)
    ft = torch.eye(3, dtype=F64).view(3, 1, 3, 1)  # different channels and resolution
    expected = (6 - 2 * math.sqrt(2) - 4 / math.sqrt(6)) / 9
    assert similarity_preserving_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1709542, abs=1e-6)


def test_similarity_preserving_equals_numpy_reference_summed_over_levels_and_resolutions():
    student = [_randn(6, 4, 8, 8, seed=34), _randn(6, 8, 4, 4, seed=35)]
    teacher = [_randn(6, 16, 4, 4, seed=36), _randn(6, 32, 2, 2, seed=37)]
    expected = sum(_sp_numpy(s.numpy(), t.numpy()) for s, t in zip(student, teacher))
    assert similarity_preserving_loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)


def test_similarity_preserving_uses_paper_l2_rows_not_torchdistill_l1_rows():
    fs, ft = _randn(5, 3, 4, 4, seed=38), _randn(5, 6, 2, 2, seed=39)
    # torchdistill SPKDLoss: normalize(G, 1) -> p=1 (L1 rows).
    gs = F.normalize(fs.flatten(1) @ fs.flatten(1).T, 1)
    gt = F.normalize(ft.flatten(1) @ ft.flatten(1).T, 1)
    l1_variant = (gs - gt).pow(2).sum() / 25
    assert l1_variant.item() == pytest.approx(_sp_numpy(fs.numpy(), ft.numpy(), row_norm_ord=1), rel=1e-10)
    got = similarity_preserving_loss([fs], [ft])
    assert got.item() == pytest.approx(_sp_numpy(fs.numpy(), ft.numpy()), rel=1e-10)
    assert abs(got.item() - l1_variant.item()) > 0.1 * got.item()


def test_similarity_preserving_works_on_a_gathered_global_batch_of_any_size():
    # A "global" batch (two ranks' halves concatenated) is just a bigger b.
    halves_s = [_randn(3, 4, 4, 4, seed=40), _randn(3, 4, 4, 4, seed=41)]
    halves_t = [_randn(3, 8, 2, 2, seed=42), _randn(3, 8, 2, 2, seed=43)]
    fs, ft = torch.cat(halves_s), torch.cat(halves_t)
    assert similarity_preserving_loss(fs, ft).item() == pytest.approx(
        _sp_numpy(fs.numpy(), ft.numpy()), rel=1e-10
    )


def test_similarity_preserving_gives_teacher_no_gradient():
    fs = _randn(4, 3, 4, 4, seed=44, requires_grad=True)
    ft = _randn(4, 5, 2, 2, seed=45, requires_grad=True)
    similarity_preserving_loss([fs], [ft]).backward()
    assert fs.grad is not None and ft.grad is None


def test_similarity_preserving_rejects_different_batch_sizes():
    with pytest.raises(ValueError, match="batch"):
        similarity_preserving_loss([torch.zeros(2, 1, 2, 2)], [torch.zeros(3, 1, 2, 2)])


# =========================================================================== stage-1 hint


def _attended_reference(x):
    # a(F) = mean_c(F^2), rescaled per sample to sum h*w (mean 1); A(F) = a(F) * F.
    h, w = x.shape[2:]
    a = x.pow(2).mean(1, keepdim=True)
    a = a / a.sum(dim=(2, 3), keepdim=True) * (h * w)
    return a * x


def test_hint_loss_is_zero_with_identity_adapter_and_equal_features():
    fs = _randn(2, 4, 8, 8, seed=46)
    loss = hint_loss([fs, fs[:, :2]], [fs.clone(), fs[:, :2].clone()], [nn.Identity(), lambda x: x])
    assert loss.item() == 0.0


def test_hint_loss_equals_mse_of_adapted_attended_features_summed_over_levels():
    student = [_randn(3, 4, 8, 8, seed=47), _randn(3, 6, 4, 4, seed=48)]
    teacher = [_randn(3, 10, 8, 8, seed=49), _randn(3, 12, 4, 4, seed=50)]
    adapters = make_hint_adapters([4, 6], [10, 12]).double()
    expected = sum(
        F.mse_loss(F.conv2d(_attended_reference(s), a.weight), _attended_reference(t))
        for s, t, a in zip(student, teacher, adapters)
    )
    torch.testing.assert_close(hint_loss(student, teacher, adapters), expected, rtol=1e-12, atol=0)


def test_hint_loss_pools_larger_student_features_before_attention_and_adapter():
    fs, ft = _randn(2, 4, 16, 16, seed=51), _randn(2, 8, 8, 8, seed=52)
    adapters = make_hint_adapters([4], [8]).double()
    expected = F.mse_loss(adapters[0](_attended_reference(F.avg_pool2d(fs, 2))), _attended_reference(ft))
    torch.testing.assert_close(hint_loss([fs], [ft], adapters), expected, rtol=1e-12, atol=0)


def test_hint_loss_pools_larger_teacher_features_to_student_size():
    fs, ft = _randn(2, 4, 7, 7, seed=53), _randn(2, 8, 14, 14, seed=54)
    adapters = make_hint_adapters([4], [8]).double()
    expected = F.mse_loss(adapters[0](_attended_reference(fs)), _attended_reference(F.avg_pool2d(ft, 2)))
    torch.testing.assert_close(hint_loss([fs], [ft], adapters), expected, rtol=1e-12, atol=0)


def test_hint_loss_gradient_reaches_adapter_weights_and_student_but_not_teacher():
    fs = _randn(2, 4, 8, 8, seed=55, requires_grad=True)
    ft = _randn(2, 8, 8, 8, seed=56, requires_grad=True)
    adapters = make_hint_adapters([4], [8]).double()
    hint_loss([fs], [ft], adapters).backward()
    assert adapters[0].weight.grad is not None and adapters[0].weight.grad.abs().sum() > 0
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None


def test_make_hint_adapters_builds_bias_free_1x1_convs_per_level():
    adapters = make_hint_adapters([48, 64, 80], [256, 512, 1024])
    assert isinstance(adapters, nn.ModuleList) and len(adapters) == 3
    for conv, (c_in, c_out) in zip(adapters, [(48, 256), (64, 512), (80, 1024)]):
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
        assert conv.in_channels == c_in and conv.out_channels == c_out
    # Kaiming-normal with linear gain: std about 1/sqrt(c_in).
    assert adapters[2].weight.std().item() == pytest.approx(1 / math.sqrt(80), rel=0.1)
    with pytest.raises(ValueError, match="levels"):
        make_hint_adapters([1, 2], [3])


def test_half_precision_inputs_are_computed_in_float32():
    s, t = _randn(4, 14, seed=57, scale=3.0), _randn(4, 14, seed=58, scale=3.0)
    got = kd_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    ref = kd_loss(s.bfloat16().double(), t.bfloat16().double())  # same rounded inputs, float64 maths
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # The hint adapter runs in the student's dtype; the loss comes back in float32.
    fs, ft = _randn(2, 4, 8, 8, seed=59).bfloat16(), _randn(2, 8, 4, 4, seed=60).bfloat16()
    adapters = make_hint_adapters([4], [8]).bfloat16()
    assert hint_loss([fs], [ft], adapters).dtype == torch.float32
    assert attention_transfer_loss([fs], [ft]).dtype == torch.float32


def test_hint_loss_rejects_wrong_number_of_adapters():
    with pytest.raises(ValueError, match="adapters"):
        hint_loss([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)], [])

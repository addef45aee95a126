"""RMS-Net: shapes, timm contract, shrinkage unit maths, gradients, and the paper's size budget."""
import pytest
import timm
import torch
import torch.nn.functional as F

import rmsnet  # noqa: F401  registers rmsnet_* with timm
from rmsnet.model import RMSNet, with_shrinkage
from rmsnet.shrinkage import ChannelThreshold, ResidualShrinkageUnit, soft_threshold
from rmsnet.summary import count_macs

VARIANTS = ["rmsnet_xxs", "rmsnet_xs"]
# (stage-2, stage-3, stage-4) channels: the distillation taps
TAP_CHANNELS = {"rmsnet_xxs": [48, 64, 80], "rmsnet_xs": [64, 80, 96]}


def shrinkage_units(model):
    return [m for m in model.modules() if isinstance(m, ResidualShrinkageUnit)]


@pytest.fixture(scope="module")
def xxs():
    torch.manual_seed(0)
    return timm.create_model("rmsnet_xxs", num_classes=14).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_gives_finite_logits_and_stage_taps_at_several_sizes(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=14, in_chans=1).eval()
    for size in (64, 96, 128, 224):
        x = torch.rand(2, 1, size, size)
        with torch.no_grad():
            logits = model(x)
            final, feats = model.forward_intermediates(x)
        assert logits.shape == (2, 14) and torch.isfinite(logits).all()
        assert [tuple(f.shape) for f in feats] == [
            (2, c, size // r, size // r) for c, r in zip(TAP_CHANNELS[name], (8, 16, 32))]
        assert all(torch.isfinite(f).all() for f in feats)
        assert torch.equal(model.forward_head(final), logits)


def test_variants_are_registered_with_timm_and_plain_mobilevit_baseline_stays_available():
    names = timm.list_models("rmsnet_*")
    assert set(VARIANTS) <= set(names)
    baseline = timm.create_model("mobilevit_xxs", num_classes=14, in_chans=1)
    assert not isinstance(baseline, RMSNet) and not shrinkage_units(baseline)


def test_rmsnet_takes_one_input_channel_natively(xxs):
    assert xxs.in_chans == 1 and xxs.stem.conv.in_channels == 1
    assert xxs.num_classes == 14 and xxs.pretrained_cfg["input_size"][0] == 1


def test_forward_intermediates_defaults_to_last_three_stage_outputs_not_final_conv(xxs):
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        feats = xxs.forward_intermediates(x, intermediates_only=True)
        final, _ = xxs.forward_intermediates(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(48, 32, 32), (64, 16, 16), (80, 8, 8)]
    assert final.shape[1] == 320  # the final 1x1 conv still runs before the head


def test_forward_features_and_pre_logits_follow_timm_contract(xxs):
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feats = xxs.forward_features(x)  # (b, 320, 2, 2)
        pooled = xxs.forward_head(feats, pre_logits=True)
        logits = xxs.forward_head(feats)
    assert feats.shape == (2, 320, 2, 2) and pooled.shape == (2, 320) and logits.shape == (2, 14)
    xxs_copy = timm.create_model("rmsnet_xxs", num_classes=14)
    xxs_copy.reset_classifier(6)
    assert xxs_copy(x).shape == (2, 6)


def test_shrinkage_units_follow_every_block_of_the_two_convolutional_stages(xxs):
    names = [n for n, m in xxs.named_modules() if isinstance(m, ResidualShrinkageUnit)]
    assert names == ["stages.0.1", "stages.1.1", "stages.1.3", "stages.1.5"]
    assert not any(isinstance(m, ResidualShrinkageUnit) for m in xxs.stages[2:].modules())


def test_with_shrinkage_keeps_the_timm_config_stage_count_and_widths():
    from timm.models.mobilevit import model_cfgs
    base = model_cfgs["mobilevit_xxs"]
    cfg = with_shrinkage(base)
    assert len(cfg.blocks) == len(base.blocks) and cfg.blocks[2:] == base.blocks[2:]
    assert [b.c for b in cfg.blocks[1]] == [24] * 6


def test_gradients_reach_every_shrinkage_parameter():
    torch.manual_seed(0)
    model = timm.create_model("rmsnet_xxs", num_classes=14).train()
    logits = model(torch.rand(2, 1, 64, 64))
    F.binary_cross_entropy_with_logits(logits, torch.randint(0, 2, (2, 14)).float()).backward()
    units = shrinkage_units(model)
    assert len(units) == 4
    for unit in units:
        for name, p in unit.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_soft_threshold_equals_softshrink_per_channel_for_fixed_threshold():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5) * 2
    taus = [0.1, 0.5, 1.5]
    y = soft_threshold(x, torch.tensor(taus).reshape(1, 3, 1, 1))
    for c, tau in enumerate(taus):
        torch.testing.assert_close(y[:, c], F.softshrink(x[:, c], lambd=tau), rtol=0, atol=0)


def test_soft_threshold_zeroes_small_values_and_keeps_sign_of_large_ones():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0]).reshape(1, 1, 1, 5)
    y = soft_threshold(x, torch.tensor(1.0))
    assert y.flatten().tolist() == [-2.0, 0.0, 0.0, 0.0, 2.0]


def test_learned_threshold_lies_between_zero_and_channel_mean_magnitude():
    torch.manual_seed(0)
    r = torch.randn(4, 16, 8, 8)
    tau = ChannelThreshold(16).train()(r)  # (b, c, 1, 1)
    mean_abs = r.abs().mean(dim=(2, 3), keepdim=True)
    assert tau.shape == (4, 16, 1, 1)
    assert (tau > 0).all() and (tau < mean_abs).all()


def test_shrinkage_unit_is_identity_plus_thresholded_branch_with_same_shape():
    torch.manual_seed(0)
    unit = ResidualShrinkageUnit(8).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        r = unit.bn_pw(unit.conv_pw(unit.act(unit.bn_dw(unit.conv_dw(x)))))
        expected = x + soft_threshold(r, unit.threshold(r))
        out = unit(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)


def test_shrinkage_block_refuses_to_change_width_or_stride():
    from rmsnet.model import _ShrinkageBlock
    with pytest.raises(ValueError, match="keeps its shape"):
        _ShrinkageBlock(in_chs=16, out_chs=24)
    with pytest.raises(ValueError, match="keeps its shape"):
        _ShrinkageBlock(in_chs=16, stride=2)


def test_rmsnet_xxs_matches_paper_size_within_3pct_params_and_5pct_macs(xxs):
    params = sum(p.numel() for p in xxs.parameters())
    macs = count_macs(xxs, 224, 1)
    assert 931_200 <= params <= 988_800, params  # 0.96 M +- 3 %
    assert 0.2565e9 <= macs <= 0.2835e9, macs  # 0.27 G +- 5 %
    baseline = timm.create_model("mobilevit_xxs", num_classes=14, in_chans=1)
    extra_params = params - sum(p.numel() for p in baseline.parameters())
    assert 0 < extra_params <= 30_000  # the shrinkage units are light

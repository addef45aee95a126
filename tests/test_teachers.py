"""TappedModel and teachers: one-pass logits + taps, input handling, strict loading, freezing."""
import pytest
import torch
import torch.nn.functional as F

import rmsnet  # noqa: F401
from rmsnet.teachers import (CheckpointMismatchError, TappedModel, create_tapped_model, create_teacher,
                             freeze, load_checkpoint)

# name, extra timm kwargs, image size that keeps the test fast
TAPPED = [("rmsnet_xxs", {}, 64), ("resnet18", {}, 64), ("vit_tiny_patch16_224", {"img_size": 64}, 64)]


def random_teacher(name="resnet18", num_classes=14, **kw):
    with pytest.warns(UserWarning, match="random"):
        return create_teacher(name, num_classes, checkpoint=None, **kw)


@pytest.mark.parametrize("name,kw,size", TAPPED, ids=[t[0] for t in TAPPED])
def test_tapped_logits_equal_model_on_normalised_input_from_one_pass(name, kw, size):
    torch.manual_seed(0)
    tapped = create_tapped_model(name, 14, **kw).eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        logits, feats = tapped(x)
        expected = tapped.model(tapped.normalise(x))
    assert torch.equal(logits, expected)
    assert torch.equal(tapped.forward_logits(x), expected)
    assert len(feats) == 3 and all(f.dim() == 4 and f.shape[0] == 2 for f in feats)


def test_default_taps_are_last_three_stages_for_cnn_student_and_baseline():
    assert create_tapped_model("resnet18", 14).feature_channels(64) == [128, 256, 512]
    assert create_tapped_model("rmsnet_xxs", 14).feature_channels(256) == [48, 64, 80]
    baseline = create_tapped_model("mobilevit_xxs", 14, in_chans=1)  # stage output, not the 320-ch conv
    assert baseline.feature_shapes(256) == [(48, 32, 32), (64, 16, 16), (80, 8, 8)]


def test_explicit_and_negative_feature_indices_select_levels():
    tapped = create_tapped_model("resnet18", 14, feature_indices=[1, -1])
    assert tapped.feature_indices == [1, 4] and tapped.feature_channels(64) == [64, 512]
    with pytest.raises(ValueError, match="out of range"):
        create_tapped_model("resnet18", 14, feature_indices=[7])


def test_grayscale_is_repeated_for_rgb_teacher_and_normalised_with_its_pretrained_cfg():
    tapped = create_tapped_model("resnet18", 14)
    cfg = tapped.model.pretrained_cfg
    x = torch.rand(2, 1, 8, 8)
    y = tapped.normalise(x)  # (2, 3, 8, 8)
    assert y.shape == (2, 3, 8, 8)
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x[:, 0] - cfg["mean"][c]) / cfg["std"][c])


def test_one_channel_student_gets_default_gray_normalisation_and_overrides_win():
    student = create_tapped_model("rmsnet_xxs", 14)
    assert student.in_chans == 1
    assert student.mean.flatten().tolist() == [0.5] and student.std.flatten().tolist() == [0.25]
    custom = create_tapped_model("resnet18", 14, mean=(0.1,), std=(0.2,))
    torch.testing.assert_close(custom.normalise(torch.full((1, 1, 2, 2), 0.5)), torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="mean has 2 values"):
        create_tapped_model("resnet18", 14, mean=(0.1, 0.2), std=(0.2,))


def test_feature_shapes_dry_run_leaves_a_training_student_and_its_bn_statistics_alone():
    student = create_tapped_model("rmsnet_xxs", 14).train()
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    student.feature_channels(64)
    assert student.training and student.model.training
    assert all(torch.equal(before[k], v) for k, v in student.model.state_dict().items())


@pytest.mark.parametrize("wrap", ["plain", "project", "module_prefix"])
def test_teacher_loads_torch_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    source = create_tapped_model("resnet18", 14).eval()
    state = source.model.state_dict()
    if wrap == "project":
        state = {"model": state, "step": torch.tensor(3)}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    teacher = create_teacher("resnet18", 14, checkpoint=str(path))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x)[0], source(x)[0])


def test_teacher_loads_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    source = create_tapped_model("resnet18", 14).eval()
    path = tmp_path / "teacher.safetensors"
    safetensors_torch.save_file(source.model.state_dict(), str(path))
    teacher = create_teacher("resnet18", 14, checkpoint=str(path))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x)[0], source(x)[0])


def test_a_saved_tapped_model_state_dict_loads_into_the_timm_model(tmp_path):
    source = create_tapped_model("rmsnet_xxs", 14)
    path = tmp_path / "student.pt"
    torch.save(source.state_dict(), path)  # keys "model.*"
    target = create_tapped_model("rmsnet_xxs", 14)
    load_checkpoint(target, str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_mismatched_checkpoint_is_one_error_naming_file_and_counts_and_loads_nothing(tmp_path):
    state = create_tapped_model("resnet18", 14).model.state_dict()
    del state["layer1.0.bn1.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong_teacher.pt"
    torch.save(state, path)
    target = create_tapped_model("resnet18", 10).model  # fc.weight and fc.bias differ in shape
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(target, str(path))
    msg = str(err.value)
    assert str(path) in msg and "resnet18" in msg
    assert "1 missing keys" in msg and "1 unexpected keys" in msg and "2 shape mismatches" in msg
    assert "layer1.0.bn1.bias" in msg and "extra.weight" in msg and "fc.weight" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_or_unreadable_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        create_teacher("resnet18", 14, checkpoint=str(tmp_path / "nowhere.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(create_tapped_model("resnet18", 14), str(junk))


def test_an_unreadable_checkpoint_is_described_for_what_it_is(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    cases = {"empty.pt": (b"", "is an empty file"),
             "notes.pt": (b"teacher: see the shared drive\n", "is a text file (30 bytes, starting 'teacher: see"),
             "cut.pt": (data[: len(data) // 2], f"is a torch.save zip archive of {len(data) // 2} bytes that "
                                               f"cannot be read: damaged or cut short"),
             "noise.pt": (bytes(range(1, 250)) * 2, "is not a checkpoint: neither a torch.save file nor safetensors")}
    for name, (content, said) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as e:
            load_checkpoint(create_tapped_model("resnet18", 14), str(tmp_path / name))
        assert str(e.value).startswith(f"checkpoint {tmp_path / name} {said}"), str(e.value)
        assert "\n" not in str(e.value)


def test_hub_download_and_unknown_names_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="checkpoint"):
        create_tapped_model("resnet18", 14, pretrained=True)
    with pytest.raises(ValueError, match="no_such_net"):
        create_tapped_model("no_such_net", 14)


def test_frozen_teacher_stays_in_eval_when_train_is_called_on_it_or_a_parent():
    teacher = random_teacher()
    parent = torch.nn.ModuleDict({"teacher": teacher})
    parent.train()
    teacher.train()
    teacher.model.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_gets_no_gradient_and_is_not_in_the_student_optimizer():
    torch.manual_seed(0)
    teacher = random_teacher("resnet18")
    student = create_tapped_model("rmsnet_xxs", 14).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    x = torch.rand(2, 1, 64, 64)
    t_logits, t_feats = teacher(x)
    s_logits, s_feats = student(x)
    loss = F.mse_loss(s_logits, t_logits) + sum(
        F.mse_loss(s.pow(2).mean(1), F.adaptive_avg_pool2d(t.pow(2).mean(1, keepdim=True), s.shape[-2:])[:, 0])
        for s, t in zip(s_feats, t_feats))
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    optimizer_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimizer_ids & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))


def test_freeze_works_on_any_module_and_returns_it():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    assert freeze(net) is net
    net.train()
    assert not net.training and not net[1].training and not net[0].weight.requires_grad


def test_tapped_model_rejects_images_with_wrong_channel_count_or_rank():
    tapped = TappedModel(create_tapped_model("resnet18", 14).model, None, (0.5,), (0.25,))
    with pytest.raises(ValueError, match="3 channels, got images with 2"):
        tapped(torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="b, c, h, w"):
        tapped(torch.rand(1, 16, 16))


def test_pretrained_file_loads_published_weights_with_a_new_head_and_adapted_stem(tmp_path):
    """ImageNet-style weights (1000 classes, RGB stem) start a 14-class grayscale model: backbone
    copied, classifier re-initialised to the new class count, stem summed over RGB."""
    import timm

    published = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(published.state_dict(), path)
    tapped = create_tapped_model("resnet18", 14, in_chans=1, pretrained_file=str(path))
    assert torch.equal(tapped.model.layer4[1].conv2.weight, published.layer4[1].conv2.weight)
    assert tapped.model.fc.weight.shape == (14, 512)
    torch.testing.assert_close(tapped.model.conv1.weight, published.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_tapped_model("resnet18", 14, pretrained_file=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name, in_chans", [("resnet18", 3), ("rmsnet_xxs", 1)])
def test_half_precision_parameters_take_fp32_images_and_normalise_in_fp32(name, in_chans):
    """DeepSpeed's bf16 engine casts parameters, not the wrapper's mean/std buffers; images arrive
    as fp32 from the loader or already cast. Either way the model is fed its parameters' dtype,
    after an fp32 normalisation equal to the fp32 model's."""
    torch.manual_seed(0)
    m = create_tapped_model(name, 4, in_chans=in_chans)
    x = torch.rand(2, 1, 48, 48)
    reference = m.normalise(x)
    m.model.to(torch.bfloat16)
    assert m.mean.dtype == torch.float32  # left alone, as DeepSpeed leaves it
    assert torch.equal(m.normalise(x), reference.to(torch.bfloat16))
    for images in (x, x.to(torch.bfloat16)):
        logits, feats = m(images)
        assert logits.dtype == torch.bfloat16 and all(f.dtype == torch.bfloat16 for f in feats)
        assert m.forward_logits(images).shape == (2, 4)

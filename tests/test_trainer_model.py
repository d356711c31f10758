"""trainer/model.py: heads, losses, init weights and the model bundle."""
import pickle

import numpy as np
import pytest
import torch

from trainer.bundle import BUNDLE_FORMAT, BundleError, Provenance, load_bundle, save_bundle
from trainer.model import (HEADS, MAX_AGE, MIN_AGE, TTA, TTA_ZOOMS, age_targets, age_weights, build_model, decode,
                           load_init_weights, loss_fn, predict_ages, tta_views)


@pytest.mark.parametrize("head", HEADS)
def test_heads_decode_ages(head):
    torch.manual_seed(0)
    net = build_model(head).eval()
    with torch.no_grad():
        out = net(torch.randn(4, 3, 32, 32))
    age, std = decode(out, head)
    assert age.shape == std.shape == (4,)
    if head == "distribution":
        assert out.shape == (4, MAX_AGE + 1)
        assert torch.all((age >= 0) & (age <= MAX_AGE)) and torch.all(std > 0)
    else:
        assert torch.isnan(std).all()


def test_distribution_decodes_a_peaked_output_to_its_age():
    logits = torch.log(age_targets(torch.tensor([7.0, 64.0]), sigma=1.0))
    age, std = decode(logits, "distribution")
    assert torch.allclose(age, torch.tensor([7.0, 64.0]), atol=1e-3)
    assert torch.allclose(std, torch.tensor([1.0, 1.0]), atol=1e-2)


@pytest.mark.parametrize("head", HEADS)
def test_losses_fall_when_a_model_fits_a_batch(head):
    torch.manual_seed(0)
    net = build_model(head)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([3.0, 10, 22, 30, 41, 55, 70, 90])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = loss_fn(net(x), y, head)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_init_weights_skip_the_classifier(tmp_path):
    import torchvision

    donor = torchvision.models.resnet18(weights=None)  # ImageNet-shaped: 1000-class fc
    path = tmp_path / "resnet18.pth"
    torch.save(donor.state_dict(), path)
    net = build_model("distribution")
    report = load_init_weights(net, str(path))
    assert "fc.weight" in report["skipped"] and "conv1.weight" in report["loaded"]
    assert torch.equal(net.conv1.weight, donor.conv1.weight)


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(1)
    net = build_model("distribution").eval()
    path = tmp_path / "model.pt"
    save_bundle(str(path), net, "distribution", 32, {"size": 32, "margin": 0.0},
                Provenance({"uri": "file:/data/faces", "version": 3}, {"lr": 0.001},
                           {"val_mae": 6.1, "test_mae": float("nan")}), normalize=([0.5] * 3, [0.25] * 3))
    loaded, bundle = load_bundle(str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert bundle["data"] == {"uri": "file:/data/faces", "version": 3} and bundle["metrics"]["test_mae"] is None
    assert torch.load(path, weights_only=True)["head"] == "distribution"


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_bundles_are_refused_with_a_reason(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(BundleError, match="unreadable, corrupt"):
        load_bundle(str(corrupt))
    foreign = tmp_path / "state.pt"
    torch.save(build_model("regression").state_dict(), foreign)
    with pytest.raises(BundleError, match="plain state dict, not a faceage model bundle"):
        load_bundle(str(foreign))
    code = tmp_path / "code.pt"
    with open(code, "wb") as f:
        pickle.dump({"format": BUNDLE_FORMAT, "x": _Payload()}, f)
    with pytest.raises(BundleError, match="will not be run"):
        load_bundle(str(code))
    assert "this must never run" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_bundle(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("tta", TTA)
def test_regression_ages_are_clipped_into_the_age_range_and_nan_stays_nan(tta):
    model = build_model("regression").eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        x = torch.randn(3, 3, 32, 32)
        for bias, expected in ((-5.0, float(MIN_AGE)), (1e30, float(MAX_AGE)), (33.0, 33.0)):
            model.fc.bias.fill_(bias)
            age, _ = predict_ages(model, x, "regression", tta)
            assert torch.allclose(age, torch.full((3,), expected)), (bias, age)
        model.fc.bias.fill_(float("nan"))
        age, _ = predict_ages(model, x, "regression", tta)
        assert torch.isnan(age).all()


@pytest.mark.parametrize("head", HEADS)
def test_flip_tta_only_averages_the_two_passes(head):
    torch.manual_seed(0)
    model = build_model(head).eval()
    half = torch.randn(3, 3, 32, 16)
    symmetric = torch.cat([half, torch.flip(half, dims=[3])], dim=3)  # each image equals its mirror
    with torch.no_grad():
        plain, _ = predict_ages(model, symmetric, head, "none")
        flipped, _ = predict_ages(model, symmetric, head, "flip")
        assert torch.allclose(plain, flipped, atol=1e-4)  # nothing to average: the same ages
        x = torch.randn(4, 3, 32, 32)
        a, _ = predict_ages(model, x, head, "none")
        b, _ = predict_ages(model, torch.flip(x, dims=[3]), head, "none")
        both, _ = predict_ages(model, x, head, "flip")
    if head == "regression":
        assert torch.allclose(both, (a + b) / 2, atol=1e-5)
    else:  # the averaged distribution's mean is the mean of the two means
        assert torch.allclose(both, (a + b) / 2, atol=1e-3)
    assert not torch.allclose(a, b)  # the mirror did give another answer, so averaging was real
    with pytest.raises(ValueError, match="tta 'rotate'"):
        predict_ages(model, x, head, "rotate")


@pytest.mark.parametrize("scale", TTA_ZOOMS["flip-zoom"])
def test_a_zoom_view_is_the_warp_training_applies_at_that_scale(scale):
    """The zoom of flip-zoom is trainer.augment's warp at a fixed scale (black outside, no colour change): the
    views the model is asked about are views it was trained on; in numpy (what ONNX Runtime gets) and in torch."""
    from trainer import augment, runtime
    from trainer.bundle import normalize

    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    n = len(images)
    warped = augment.apply(images, {"scale": torch.full((n,), scale), "shift": torch.zeros(n, 2),
                                    "flip": torch.zeros(n, dtype=torch.bool), "brightness": torch.ones(n),
                                    "contrast": torch.ones(n), "saturation": torch.ones(n)})
    want = normalize(warped)  # warped first, normalised after: black stays black
    views = list(tta_views(normalize(images), "flip-zoom"))
    got = views[2 * TTA_ZOOMS["flip-zoom"].index(scale)]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.equal(views[2 * TTA_ZOOMS["flip-zoom"].index(scale) + 1], torch.flip(got, dims=[3]))
    black = torch.as_tensor(-runtime.MEAN / runtime.STD).view(1, 3, 1, 1)
    in_numpy = list(runtime.tta_views(normalize(images).numpy(), "flip-zoom", black.numpy()))
    assert all(np.abs(a.numpy() - b).max() < 1e-4 for a, b in zip(views, in_numpy))
    if scale != 1.0:
        assert not torch.allclose(got, normalize(images), atol=0.1)  # a zoom did change the pixels
    if scale < 1.0:  # the corners show what is outside the face: black, as in training
        assert torch.allclose(got[..., 0, 0], black.view(1, 3).expand(n, 3), atol=1e-4)


@pytest.mark.parametrize("head", HEADS)
def test_flip_zoom_tta_averages_its_six_views(head):
    torch.manual_seed(0)
    model = build_model(head).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outs = [model(view).float() for view in tta_views(x, "flip-zoom")]
        got, _ = predict_ages(model, x, head, "flip-zoom")
        flip, _ = predict_ages(model, x, head, "flip")
    assert len(outs) == 2 * len(TTA_ZOOMS["flip-zoom"]) == 6
    if head == "regression":
        want = sum(o.squeeze(1) for o in outs) / 6
    else:
        want = (sum(torch.softmax(o, dim=1) for o in outs) / 6) @ torch.arange(MAX_AGE + 1, dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-3)
    assert not torch.allclose(got, flip, atol=1e-3)  # the zooms did change the answer


def test_age_weights_are_the_inverse_sqrt_of_the_smoothed_histogram_averaging_one():
    """Two age groups far apart (40 years >> the 2-year smoothing): 400 faces aged 20, 25 aged 60 -> the rare age
    weighs sqrt(400 / 25) = 4 times the common one, and the 425 rows' weights average exactly 1."""
    ages = [20] * 400 + [60] * 25
    w = age_weights(ages)
    assert w.shape == (MAX_AGE + 1,)
    assert float(w[60] / w[20]) == pytest.approx(4.0, rel=1e-6)
    assert float(w[torch.tensor(ages)].mean()) == pytest.approx(1.0, rel=1e-6)
    assert float(w[20]) == pytest.approx(425 / (400 + 25 * 4), rel=1e-6)
    # a much rarer age is capped at 5x the smallest weight (1 face against 10,000: sqrt would give 100x)
    capped = age_weights([30] * 10000 + [90])
    assert float(capped.max() / capped.min()) == pytest.approx(5.0, rel=1e-6)
    assert float(capped[90] / capped[30]) == pytest.approx(5.0, rel=1e-6)
    # the smoothing: an age between two observed ones borrows their counts (no infinite weight for gaps)
    assert torch.isfinite(w).all() and float(w[21]) > float(w[20])
    with pytest.raises(ValueError):
        age_weights([])


@pytest.mark.parametrize("head", HEADS)
def test_weighted_loss_is_the_mean_of_each_rows_loss_times_its_ages_weight(head):
    torch.manual_seed(0)
    outputs = torch.randn(4, 1 if head == "regression" else MAX_AGE + 1)
    ages = torch.tensor([3, 25, 25, 70])
    ones = torch.ones(MAX_AGE + 1)
    assert float(loss_fn(outputs, ages, head, weights=ones)) == pytest.approx(float(loss_fn(outputs, ages, head)),
                                                                              rel=1e-5)
    rows = torch.stack([loss_fn(outputs[i:i + 1], ages[i:i + 1], head) for i in range(4)])
    weights = torch.ones(MAX_AGE + 1)
    weights[70], weights[3] = 3.0, 0.5
    expected = (rows * torch.tensor([0.5, 1.0, 1.0, 3.0])).mean()
    assert float(loss_fn(outputs, ages, head, weights=weights)) == pytest.approx(float(expected), rel=1e-5)

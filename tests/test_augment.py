"""Batched augmentation (trainer/augment.py): deterministic under a seed, labels stay with their rows,
the warp and flip are the geometry they claim, and strength 0 changes nothing."""
import torch

from trainer.augment import apply, augment_batch, sample


def _batch(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x = _batch()
    one = augment_batch(x, 1.0, torch.Generator().manual_seed(7))
    two = augment_batch(x, 1.0, torch.Generator().manual_seed(7))
    other = augment_batch(x, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(one, two) and not torch.allclose(one, other)
    assert one.dtype == torch.float32 and one.min() >= 0 and one.max() <= 255


def test_each_row_keeps_its_own_parameters_so_labels_stay_aligned():
    x = _batch()
    params = sample(len(x), 1.0, torch.Generator().manual_seed(3))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
    whole = apply(x, params)[perm]
    permuted = apply(x[perm], {k: v[perm] for k, v in params.items()})
    assert torch.allclose(whole, permuted, atol=1e-4)
    # a row alone is augmented exactly as inside the batch: nothing mixes rows
    assert torch.allclose(apply(x[5:6], {k: v[5:6] for k, v in params.items()}), apply(x, params)[5:6], atol=1e-4)


def _only(params, **fixed):
    neutral = {"scale": 1.0, "shift": 0.0, "flip": False, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0}
    out = {}
    for k, v in params.items():
        value = fixed.get(k, neutral[k])
        out[k] = torch.full_like(v, value) if k != "flip" else torch.full_like(v, bool(value))
    return out


def test_geometry_flip_shift_and_identity():
    x = _batch(4, 32)
    params = sample(4, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(apply(x, _only(params)), x.float(), atol=1e-3)  # all neutral: the input
    assert torch.allclose(apply(x, _only(params, flip=True)), torch.flip(x.float(), dims=[3]), atol=1e-3)
    # a shift of 4 px (1/8 of 32) to the right reads the input 4 px further right; black comes in at the edge
    shifted = apply(x, {**_only(params), "shift": torch.tensor([[0.125, 0.0]] * 4)})
    assert torch.allclose(shifted[..., :-4], x.float()[..., 4:], atol=1e-3)
    assert torch.all(shifted[..., -4:] == 0)
    assert torch.equal(augment_batch(x, 0.0), x.float())  # strength 0: only converted


def test_progressive_resizing_resamples_each_row_to_the_epoch_size():
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    x[2] = 200  # one bright row: it must stay row 2 at the smaller size
    plain = augment_batch(x, 0.0, size=16)
    assert plain.shape == (4, 3, 16, 16)
    assert torch.allclose(plain[2], torch.full((3, 16, 16), 200.0)) and plain[[0, 1, 3]].abs().max() == 0
    one = augment_batch(x, 1.0, torch.Generator().manual_seed(1), size=16)
    two = augment_batch(x, 1.0, torch.Generator().manual_seed(1), size=16)
    assert one.shape == (4, 3, 16, 16) and torch.equal(one, two)
    assert augment_batch(x, 0.0, size=32).shape == (4, 3, 32, 32)

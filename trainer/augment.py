"""Training augmentation as batched tensor ops on the training device (CPU or GPU alike).

Per sample: a shift/scale crop (one affine warp, bilinear, black outside), a horizontal flip, and colour
jitter (contrast around the image's mean, saturation around each pixel's grey, then brightness), all
drawn from one seeded torch.Generator on the CPU, so a seed gives the same batch on any device. Samples
keep their place in the batch (labels stay aligned): the parameters of row i apply to row i only.

The loader hands over uint8 crops decoded straight at the training size; this replaces the per-row PIL
work the decode threads did before (trainer.data), so the threads only decode.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

SCALE, SHIFT, COLOUR = 0.15, 0.08, 0.3  # ranges at strength 1 (scale +-15 %, shift +-8 % of the side, colour +-30 %)


def sample(n: int, strength: float, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Per-sample parameters (CPU tensors of length n) for `apply`."""
    def uniform(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    return {
        "scale": 1.0 + uniform(n) * SCALE * strength,
        "shift": uniform(n, 2) * SHIFT * strength,  # fraction of the side
        "flip": torch.rand(n, generator=generator) < 0.5,
        "brightness": 1.0 + uniform(n) * COLOUR * strength,
        "contrast": 1.0 + uniform(n) * COLOUR * strength,
        "saturation": 1.0 + uniform(n) * COLOUR * strength,
    }


def apply(images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 (or float 0..255) N x 3 x H x W -> float32 0..255, augmented as `params` say, on images' device."""
    device = images.device
    x = images.float()
    n = x.shape[0]
    p = {k: v.to(device) for k, v in params.items()}
    # output pixel (u, v) in [-1, 1] reads input (sx * u / scale + 2 * shift_x, v / scale + 2 * shift_y)
    inv = 1.0 / p["scale"]
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(p["flip"], -inv, inv)
    theta[:, 1, 1] = inv
    theta[:, :, 2] = 2.0 * p["shift"]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    view = (n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * p["contrast"].view(view) + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * p["saturation"].view(view) + grey
    return (x * p["brightness"].view(view)).clamp_(0, 255)


def resize(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """float N x 3 x H x W -> N x 3 x size x size (bilinear, antialiased when shrinking); unchanged when
    size is None or already the images' size. Progressive resizing trains early epochs this way."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def augment_batch(images: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None,
                  size: Optional[int] = None) -> torch.Tensor:
    """`images` (resized to `size` first when given) augmented with freshly drawn parameters (float32 0..255);
    strength 0 only converts (and resizes)."""
    x = resize(images.float(), size)
    if strength <= 0:
        return x
    return apply(x, sample(x.shape[0], strength, generator))

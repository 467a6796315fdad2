"""Geometric augmentation applied identically to both dates (and to masks).

Each sample of a batch gets one of the 8 symmetries of the square (rotation by k*90 degrees,
optionally followed by a horizontal flip), drawn from a :class:`torch.Generator`, so a training
run's augmentation depends only on the generator's seed. Every tensor passed in for the same
sample (before, after, valid mask, pixel labels) gets the same transform. Non-square tiles get
the symmetries that keep their shape (identity, rot180 and the two flips). No radiometric change is applied: the two dates must keep their relation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dihedral(x: Tensor, code: int) -> Tensor:
    """Apply symmetry ``code`` (0-7: rot90 by ``code % 4``, then h-flip if ``code >= 4``).

    Works on the last two dimensions of ``x``.
    """
    k = code % 4
    out = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return out.flip(-1) if code >= 4 else out


def random_codes(batch: int, square: bool, generator: torch.Generator) -> list[int]:
    """One symmetry code per sample (shape-keeping ones only when tiles are not square)."""
    if square:
        return [int(c) for c in torch.randint(0, 8, (batch,), generator=generator)]
    return [(0, 2, 4, 6)[int(c)] for c in torch.randint(0, 4, (batch,), generator=generator)]


def augment_batch(*tensors: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Transform each sample of every tensor (batch first, spatial last) by the same symmetry.

    Args:
        tensors: e.g. ``before (B,C,H,W)``, ``after (B,C,H,W)``, ``valid (B,H,W)``; all with
            the same batch size and spatial size.
        generator: source of randomness (seed it per epoch for reproducible runs).

    Returns:
        the transformed tensors, in order.
    """
    if not tensors:
        return ()
    batch = tensors[0].shape[0]
    height, width = tensors[0].shape[-2:]
    codes = random_codes(batch, height == width, generator)
    out = []
    for tensor in tensors:
        out.append(torch.stack([dihedral(tensor[i], codes[i]) for i in range(batch)]))
    return tuple(out)

"""Tests for cuba.data.augment: batched random crop and horizontal flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuba.data.augment import augment_batch, augment_policy


def batch(n: int = 8, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    # strictly positive random pixels, so a shifted crop never coincides with another by chance
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) + 0.1


def test_identity_without_pad_or_flip() -> None:
    x = batch()
    assert torch.equal(augment_batch(x, pad=0, flip=False), x)


def test_crop_matches_a_shifted_window_of_the_padded_input() -> None:
    pad = 4
    x = batch(n=16)
    out = augment_batch(x, pad=pad, flip=False, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    offsets = []
    for i in range(len(x)):
        hits = [
            (oy, ox) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
            if torch.equal(out[i], xp[i, :, oy:oy + h, ox:ox + w])
        ]
        assert len(hits) == 1, f"image {i} is not exactly one shifted crop (matches: {hits})"
        offsets.append(hits[0])
    # random offsets: 16 images do not all share one shift
    assert len(set(offsets)) > 1


def test_crop_keeps_channels_together() -> None:
    # every channel of an image is shifted by the same offset
    x = batch(n=4, c=1).repeat(1, 3, 1, 1)
    out = augment_batch(x, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_flip_about_half_and_exact() -> None:
    x = batch(n=200, c=1, size=6)
    out = augment_batch(x, pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(2)) for i in range(len(x))])
    same = torch.tensor([torch.equal(out[i], x[i]) for i in range(len(x))])
    assert (flipped ^ same).all(), "every image is either unchanged or its exact horizontal mirror"
    assert 70 <= int(flipped.sum()) <= 130
    # the flip is horizontal (last axis), not vertical
    assert torch.equal(out[flipped], x[flipped].flip(3))


def test_seeded_generator_is_reproducible() -> None:
    x = batch(n=8)
    a = augment_batch(x, 4, True, generator=torch.Generator().manual_seed(5))
    b = augment_batch(x, 4, True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_channels_last_input() -> None:
    x = batch(n=4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = augment_batch(x, 2, True, generator=g1)
    b = augment_batch(x.contiguous(memory_format=torch.channels_last), 2, True, generator=g2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("setting,dataset,expected", [
    ("auto", "cifar10", (4, True)), ("auto", "cifar100", (4, True)), ("auto", "gtsrb", (4, False)),
    ("auto", "mnist", (0, False)), ("auto", "digits", (0, False)), ("auto", "my-folder", (0, False)),
    ("none", "cifar10", (0, False)), ("crop", "mnist", (4, False)), ("crop+flip", "gtsrb", (4, True)),
])
def test_augment_policy(setting: str, dataset: str, expected: tuple[int, bool]) -> None:
    assert augment_policy(setting, dataset) == expected

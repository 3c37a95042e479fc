"""StepSeed: a training step's random draws (dropout) depend only on (seed, epoch, step, rank)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from covidct.seeding import derive_seed
from covidct.training.callbacks.step_seed import StepSeed


def dropout_mask(callback: StepSeed, epoch: int, step: int, rank: int = 0) -> torch.Tensor:
    trainer = SimpleNamespace(current_epoch=epoch, global_rank=rank)  # the two attributes it reads
    callback.on_train_batch_start(trainer, None, None, step)
    return torch.nn.functional.dropout(torch.ones(1000), p=0.5)


def test_a_step_draws_the_same_whatever_ran_before_it():
    seeded = StepSeed(42)
    first = dropout_mask(seeded, epoch=3, step=7)
    torch.rand(12345)  # whatever else consumed the generator in between (other steps, validation)
    dropout_mask(seeded, epoch=0, step=0)
    assert torch.equal(dropout_mask(seeded, epoch=3, step=7), first)
    others = [
        dropout_mask(seeded, 3, 8),
        dropout_mask(seeded, 4, 7),
        dropout_mask(seeded, 3, 7, rank=1),
        dropout_mask(StepSeed(43), 3, 7),
    ]
    assert not any(torch.equal(first, other) for other in others)


def test_derived_seeds_are_32_bit_and_differ_per_key():
    seeds = {derive_seed(0, epoch, step) for epoch in range(20) for step in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**32 for s in seeds)

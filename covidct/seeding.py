"""Seeds derived from a run's seed and a position in training, so that any epoch or step can be replayed."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed for a tuple of non-negative ints, e.g. (run seed, epoch) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])

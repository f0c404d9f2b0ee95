"""A small synthetic interaction log for tests: skewed popularity and sessions with a learnable order."""

from __future__ import annotations

import numpy as np

from fastrec.data.loaders import Interactions


def synthetic(n_users: int = 200, n_items: int = 100, mean_len: float = 20.0, seed: int = 0) -> Interactions:
    """Users browse in sessions (gap of a day between sessions, a minute within one).

    Items have Zipf-like popularity (weight ``1 / rank``); within a session the next item is, with
    probability 0.6, the successor of the previous item (``i -> i + 1`` cyclically), otherwise a
    popularity draw, so a sequential model can beat popularity. Each user has at least 3 items
    (``3 + Poisson(mean_len - 3)``). Original ids are ``1000 + item`` and ``50_000 + user`` so tests
    can see the remapping.
    """
    if n_users < 1 or n_items < 2:
        raise ValueError(f"need n_users >= 1 and n_items >= 2, got {n_users} and {n_items}")
    if mean_len < 3:
        raise ValueError(f"mean_len must be >= 3, got {mean_len}")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1)
    popularity /= popularity.sum()
    users, items, times = [], [], []
    for user in range(n_users):
        length = 3 + rng.poisson(mean_len - 3)
        clock = int(rng.integers(0, 86_400 * 30))
        previous = -1
        for _ in range(length):
            new_session = previous < 0 or rng.random() < 0.2
            if new_session:
                clock += 86_400
            else:
                clock += 60
            if not new_session and rng.random() < 0.6:
                item = (previous + 1) % n_items
            else:
                item = int(rng.choice(n_items, p=popularity))
            users.append(user)
            items.append(item)
            times.append(clock)
            previous = item
    user_arr = np.asarray(users, dtype=np.int64)
    item_arr = np.asarray(items, dtype=np.int64)
    used = np.unique(item_arr)
    return Interactions(
        user=user_arr,
        item=np.searchsorted(used, item_arr).astype(np.int64) + 1,
        time=np.asarray(times, dtype=np.int64),
        n_users=n_users,
        n_items=int(used.shape[0]),
        item_ids=np.concatenate([[-1], 1000 + used]).astype(np.int64),
        user_ids=50_000 + np.arange(n_users, dtype=np.int64),
        source="synthetic",
    )

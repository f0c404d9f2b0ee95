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


def synthetic_catalogue(
    n_users: int = 100_000,
    n_items: int = 1_000_000,
    mean_len: float = 20.0,
    zipf: float = 1.0,
    session_continue: float = 0.8,
    seed: int = 0,
) -> Interactions:
    """A large synthetic log (10^5-10^7 items), built with vectorised numpy: 10^6 items and 10^5
    users take a few seconds.

    Item popularity is Zipf: the item of popularity rank r is drawn with weight ``r ** -zipf``,
    the ranks shuffled over the ids. Each user has ``3 + Poisson(mean_len - 3)`` events in
    sessions: a session opens with a popularity draw and runs through related items (the next
    id, cyclically) while each further event continues it with probability ``session_continue``;
    otherwise a new session opens (a day later; a minute between events within one). Every item
    of the catalogue keeps its id, used or not: ``n_items`` is the catalogue's size, items
    ``1..n_items``, original ids ``item - 1`` and ``user``.
    """
    if n_users < 1 or n_items < 2:
        raise ValueError(f"need n_users >= 1 and n_items >= 2, got {n_users} and {n_items}")
    if mean_len < 3:
        raise ValueError(f"mean_len must be >= 3, got {mean_len}")
    if not zipf > 0:
        raise ValueError(f"zipf must be > 0, got {zipf}")
    if not 0.0 <= session_continue < 1.0:
        raise ValueError(f"session_continue must be in [0, 1), got {session_continue}")
    rng = np.random.default_rng(seed)
    lengths = 3 + rng.poisson(mean_len - 3, size=n_users)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    position = np.arange(total, dtype=np.int64)
    opens = rng.random(total) >= session_continue
    opens[starts] = True  # a user's first event opens a session
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -zipf)
    rank = np.searchsorted(cdf, rng.random(total) * cdf[-1], side="right").clip(max=n_items - 1)
    first_item = rng.permutation(n_items)[rank]
    opened_at = np.maximum.accumulate(np.where(opens, position, 0))
    item = (first_item[opened_at] + (position - opened_at)) % n_items
    gaps = np.where(opens, 86_400, 60)
    clock = np.cumsum(gaps)
    user_start = rng.integers(0, 86_400 * 30, size=n_users)
    time = clock - np.repeat(clock[starts], lengths) + np.repeat(user_start, lengths)
    return Interactions(
        user=user,
        item=item.astype(np.int64) + 1,
        time=time.astype(np.int64),
        n_users=n_users,
        n_items=n_items,
        item_ids=np.arange(-1, n_items, dtype=np.int64),
        user_ids=np.arange(n_users, dtype=np.int64),
        source="synthetic-catalogue",
    )

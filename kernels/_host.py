"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunction objects whose calls cost
~3 us each (triton 3.6 and 3.9, measured on this project's CPU); a launch uses several, on every
call. These are the plain-int equivalents.
"""


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

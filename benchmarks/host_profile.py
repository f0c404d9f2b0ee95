"""Where a training step's host time goes: cProfile of fastrec's attention forward + backward
next to SDPA's, at a shape whose GPU work is microseconds (B=128 H=2 L=50 d=32, causal + right
padding), so that the step time is the host's. The H200 run showed ~0.9 ms per fastrec step
against SDPA's 0.36 ms there; this names the functions.

Usage: python benchmarks/host_profile.py [--steps N] [--top N] [--dtype bfloat16]
(CUDA when present, else the CPU with the default backend).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

import fastrec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    batch, heads, length, dim = 128, 2, 50, 32
    q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    kpm = torch.arange(length, device=device)[None, :] >= torch.randint(20, length + 1, (batch, 1), device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    sdpa_mask = ~(causal[None, None] | kpm[:, None, None, :])
    steps = {
        "fastrec": lambda: fastrec.functional.attention(q, k, v, causal=True, key_padding_mask=kpm),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
    }
    print(f"host profile: {device} {dtype}, B={batch} H={heads} L={length} d={dim}, {args.steps} steps")
    for name, forward in steps.items():

        def step(forward=forward):
            return torch.autograd.grad(forward(), (q, k, v), grad)

        times = {}
        for threaded in (True, False):  # the CUDA backward runs on autograd's device thread unless off
            with torch.autograd.set_multithreading_enabled(threaded):
                for _ in range(20):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[threaded] = (time.perf_counter() - start) / args.steps * 1e3
        # cProfile sees the calling thread only: profile with the backward on it.
        profile = cProfile.Profile()
        with torch.autograd.set_multithreading_enabled(False):
            profile.enable()
            for _ in range(args.steps):
                step()
            profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        print(
            f"\n=== {name}: {times[True]:.3f} ms per forward+backward step, {times[False]:.3f} ms with the "
            f"backward on the calling thread (both unprofiled)\n{text.getvalue()}"
        )


if __name__ == "__main__":
    main()

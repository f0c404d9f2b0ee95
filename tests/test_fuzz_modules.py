"""Random valid and invalid argument combinations for the drop-in modules, against torch's.

Each case builds the torch module and fastrec's twin with the same weights and calls both: the
results agree (fp32 tolerance, NaN where torch has NaN) or both raise. The cases run in one
subprocess, so a crash (a segfault) fails the test instead of ending the run. Covered:
``MultiheadAttention`` (batch size, lengths, batch_first, unbatched input, attn_mask and
key_padding_mask of valid and invalid shapes, need_weights), ``RNN``/``GRU``/``LSTM`` (layers,
directions, batch_first, unbatched, empty batches, given / wrongly shaped states), the cells
(empty, unbatched, given / wrongly shaped / wrongly formed states) and ``Dropout`` (p, training);
``Conv1d``/``Conv2d`` (channels, groups that do not divide them, kernel, stride, string and
int padding, dilation, padding modes, unbatched, empty, wrong channel count, inputs smaller than
the kernel) alone and as a ``ConvBlock`` with every activation and pool against torch's
modules in a row, and ``CaserConv`` (sizes, activations, invalid constructor arguments, 3-D and
4-D inputs, empty batches, wrong shapes) against RecBole's per-height loop on its own modules;
one input element is NaN or +-inf (recurrent, conv, Caser: or 1e3) in a third of the cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

CASES = 1200

FUZZ_SCRIPT = """
import json, random, sys, traceback
import torch
from fastrec import nn as fnn

rng = random.Random(int(sys.argv[1]))
n_cases = int(sys.argv[2])
problems = []
counts = {}


def pick(*options):
    return rng.choice(options)


def run(fn):
    try:
        return fn(), None
    except Exception as e:  # the kind of error is compared, not its text
        return None, e


def flatten(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in flatten(item)]
    if hasattr(x, "data") and isinstance(getattr(x, "data"), torch.Tensor):
        return [x.data]
    return [x]


def compare(name, desc, ours_fn, ref_fn, grad_inputs=()):
    got, err = run(ours_fn)
    expected, ref_err = run(ref_fn)
    if err is None and "tensor of 0 elements" in str(ref_err):
        return  # torch's own forward fails on this empty batch; fastrec returns the empty result
    if (err is None) != (ref_err is None):
        problems.append(f"{name} {desc}: fastrec {err!r} vs torch {ref_err!r}")
        return
    if err is not None:
        return
    a, b = flatten(got), flatten(expected)
    if len(a) != len(b):
        problems.append(f"{name} {desc}: {len(a)} outputs vs torch's {len(b)}")
        return
    for x, y in zip(a, b):
        if x is None or y is None:
            if (x is None) != (y is None):
                problems.append(f"{name} {desc}: None mismatch")
            continue
        if x.shape != y.shape or not torch.equal(torch.isnan(x), torch.isnan(y)):
            problems.append(f"{name} {desc}: shape {tuple(x.shape)} vs {tuple(y.shape)} or NaN pattern")
            return
        if not torch.allclose(x.nan_to_num(), y.nan_to_num(), atol=2e-5, rtol=2e-5):
            problems.append(f"{name} {desc}: max diff {(x - y).abs().nan_to_num().max().item():.3g}")
            return
    for ours_x, ref_x in grad_inputs:
        try:
            sum(t.float().sum() for t in flatten(got) if t is not None and t.requires_grad).backward()
            sum(t.float().sum() for t in flatten(expected) if t is not None and t.requires_grad).backward()
        except Exception as e:
            problems.append(f"{name} {desc}: backward {e!r}")
            return
        if ours_x.grad is not None or ref_x.grad is not None:
            ga = ours_x.grad if ours_x.grad is not None else torch.zeros_like(ours_x)
            gb = ref_x.grad if ref_x.grad is not None else torch.zeros_like(ref_x)
            if not torch.allclose(ga.nan_to_num(), gb.nan_to_num(), atol=2e-5, rtol=2e-5):
                problems.append(f"{name} {desc}: input gradient differs")


def twins(ours_cls, ref_cls, *args, **kwargs):
    ref, err = run(lambda: ref_cls(*args, **kwargs))
    ours, our_err = run(lambda: ours_cls(*args, **kwargs))
    if (err is None) != (our_err is None):
        problems.append(f"{ref_cls.__name__}{args}{kwargs}: constructor fastrec {our_err!r} vs torch {err!r}")
    if ref is None or ours is None:
        return None, None
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def leaf(t, grad, huge=True):
    # two copies of t, one element of it NaN, +-inf or huge in some cases (not for attention: a
    # huge score makes its flash-style backward, dS = P (dP - dO . O), cancel at fp32 precision)
    special = pick(None, None, None, None, "nan", "inf", "-inf", "1e3" if huge else None)
    if special is not None and t.numel():
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = float(special)
    return t.clone().requires_grad_(grad), t.clone().requires_grad_(grad)


def mha_case():
    embed, heads = pick(4, 8), pick(1, 2, 2, 3)
    batch_first, batched = pick(True, False), pick(True, True, False)
    batch, len_q, len_s = pick(0, 1, 3), pick(1, 4), pick(1, 4, 5)
    self_attn = pick(True, False)
    if self_attn:
        len_s = len_q
    ours, ref = twins(fnn.MultiheadAttention, torch.nn.MultiheadAttention, embed, heads, batch_first=batch_first)
    if ours is None:
        return "ctor"
    ours.eval(), ref.eval()
    def tokens(length):
        shape = (batch, length, embed) if batch_first else (length, batch, embed)
        return torch.randn(shape) if batched else torch.randn(length, embed)
    grad = pick(True, False)
    q, q_ref = leaf(tokens(len_q), grad, huge=False)
    kv = q if self_attn else tokens(len_s)
    kv_ours, kv_ref = (q, q_ref) if self_attn else (kv, kv)
    b = batch if batched else 1
    kind = pick("none", "2d", "3d", "3d_wrong", "2d_wrong", "kpm", "kpm_wrong", "4d")
    mask = kpm = None
    if kind == "2d":
        mask = pick(torch.rand(len_q, len_s) < 0.3, torch.randn(len_q, len_s))
    elif kind == "3d":
        mask = pick(torch.rand(b * heads, len_q, len_s) < 0.3, torch.randn(b * heads, len_q, len_s))
    elif kind == "3d_wrong":
        wrong = ((max(b, 1), heads * len_q, len_s), (1, len_q, len_s + 1), (b * heads + 1, len_q, len_s))
        mask = torch.zeros(pick(*wrong))
    elif kind == "2d_wrong":
        mask = torch.zeros(len_q + 1, len_s, dtype=torch.bool)
    elif kind == "4d":
        mask = torch.zeros(b, heads, len_q, len_s, dtype=torch.bool)
    elif kind == "kpm":
        kpm = torch.rand(b, len_s) < 0.3 if batched else torch.rand(len_s) < 0.3
    elif kind == "kpm_wrong":
        kpm = torch.zeros(b + 1, len_s, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = False  # no fully masked row: there torch's weights give NaN, fastrec's 0
    if kpm is not None and kpm.numel():
        kpm[..., 0] = False
    need = pick(True, False)
    desc = f"E={embed} H={heads} bf={batch_first} batched={batched} B={batch} L={len_q} S={len_s} {kind} nw={need}"
    call = lambda m, x, y: m(x, y, y, attn_mask=mask, key_padding_mask=kpm, need_weights=need)
    grads = [(q, q_ref)] if grad else []
    compare("MultiheadAttention", desc, lambda: call(ours, q, kv_ours), lambda: call(ref, q_ref, kv_ref), grads)
    return kind


def rnn_case():
    name = pick("RNN", "GRU", "LSTM")
    size, hidden = 3, pick(2, 4)
    layers, bidir, batch_first = pick(1, 2), pick(True, False), pick(True, False)
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    if name == "RNN":
        kwargs["nonlinearity"] = pick("tanh", "relu")
    ours, ref = twins(getattr(fnn, name), getattr(torch.nn, name), size, hidden, **kwargs)
    ref.eval(), ours.eval()
    batched, batch, steps = pick(True, True, False), pick(0, 1, 3), pick(1, 4)
    shape = ((batch, steps) if batch_first else (steps, batch)) if batched else (steps,)
    feat = pick(size, size, size + 1)
    grad = pick(True, False)
    x, x_ref = leaf(torch.randn(*shape, feat), grad)
    dirs = 2 if bidir else 1
    state_kind = pick("none", "given", "wrong")
    hx = None
    if state_kind != "none":
        sb = batch + (1 if state_kind == "wrong" else 0)
        h_shape = (layers * dirs, sb, hidden) if batched else (layers * dirs, hidden)
        hx = torch.randn(h_shape)
        if name == "LSTM":
            hx = (hx, torch.randn(h_shape))
    desc = f"{kwargs} batched={batched} B={batch} T={steps} I={feat} hx={state_kind}"
    compare(name, desc, lambda: ours(x, hx), lambda: ref(x_ref, hx), [(x, x_ref)] if grad else [])
    return name


def cell_case():
    name = pick("RNNCell", "GRUCell", "LSTMCell")
    ours, ref = twins(getattr(fnn, name), getattr(torch.nn, name), 3, 4)
    batched, batch = pick(True, False), pick(0, 1, 3)
    grad = pick(True, False)
    x, x_ref = leaf(torch.randn(batch, 3) if batched else torch.randn(3), grad)
    state_kind = pick("none", "given", "wrong", "form")
    h_shape = (batch, 4) if batched else (4,)
    hx = None
    if state_kind == "given" or state_kind == "wrong":
        if state_kind == "wrong":
            h_shape = (batch + 1, 4) if batched else (5,)
        hx = torch.randn(h_shape)
        hx = (hx, torch.randn(h_shape)) if name == "LSTMCell" else hx
    elif state_kind == "form":  # a tuple for RNNCell / GRUCell, a tensor for LSTMCell
        hx = torch.randn(h_shape) if name == "LSTMCell" else (torch.randn(h_shape), torch.randn(h_shape))
    desc = f"batched={batched} B={batch} hx={state_kind}"
    compare(name, desc, lambda: ours(x, hx), lambda: ref(x_ref, hx), [(x, x_ref)] if grad else [])
    return name


def dropout_case():
    p = pick(0.0, 0.3, 1.0, -0.1, 1.5)
    ours, ref = twins(fnn.Dropout, torch.nn.Dropout, p)
    if ours is None:
        return "ctor"
    training = pick(True, False)
    ours.train(training), ref.train(training)
    x = torch.randn(pick((0, 4), (3, 5), (7,)))
    desc = f"p={p} training={training} shape={tuple(x.shape)}"
    if not training or p in (0.0, 1.0):
        compare("Dropout", desc, lambda: ours(x), lambda: ref(x))
    else:  # another draw: kept entries are x / (1 - p), the others 0
        y, err = run(lambda: ours(x))
        if err is not None or y.shape != x.shape or not torch.all((y == 0) | torch.isclose(y, x / (1 - p))):
            problems.append(f"Dropout {desc}: {err!r}")
    return "dropout"


ACT_MODULES = {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh,
               "sigmoid": torch.nn.Sigmoid}


def conv_case():
    dim = pick(1, 2)
    name = f"Conv{dim}d"
    groups, c_in, c_out = pick(1, 1, 2, 3), pick(2, 4, 6), pick(2, 4, 6)
    kwargs = dict(stride=pick(1, 2), padding=pick(0, 1, "same", "valid"), dilation=pick(1, 2), groups=groups,
                  bias=pick(True, False), padding_mode=pick("zeros", "zeros", "reflect", "circular", "replicate"))
    ours, ref = twins(getattr(fnn, name), getattr(torch.nn, name), c_in, c_out, pick(1, 2, 3), **kwargs)
    if ours is None:
        return "ctor"
    batched, batch = pick(True, True, False), pick(0, 1, 3)
    feat, size = pick(c_in, c_in, c_in + 1), pick(1, 3, 8)
    shape = ((batch,) if batched else ()) + (feat,) + (size,) * dim
    grad = pick(True, False)
    x, x_ref = leaf(torch.randn(shape), grad)
    fused = kwargs["padding_mode"] == "zeros" and pick(True, True, False)
    label = "module"
    if fused:  # ConvBlock over the same conv: act and max-pool fused, against torch's modules in a row
        act, pool = pick(*ACT_MODULES), pick(1, 2, 3)
        pool_cls = torch.nn.MaxPool1d if dim == 1 else torch.nn.MaxPool2d
        ours = fnn.ConvBlock.from_modules(ours, ACT_MODULES[act](), pool_cls(pool) if pool > 1 else None)
        ref = torch.nn.Sequential(ref, ACT_MODULES[act](), pool_cls(pool) if pool > 1 else torch.nn.Identity())
        kwargs.update(act=act, pool=pool)
        label = "block"
    desc = f"{name} {c_in}->{c_out} {kwargs} batched={batched} x={tuple(x.shape)}"
    compare(name, desc, lambda: ours(x), lambda: ref(x_ref), [(x, x_ref)] if grad else [])
    return label


def caser_reference(block, E):
    # RecBole's Caser convolutions: one nn.Conv2d + activation + max-pool per height, on the
    # block's own modules
    act_h, act_v = ACT_MODULES[block.act_h](), ACT_MODULES[block.act_v]()
    x = E if E.dim() == 4 else E.unsqueeze(1)
    pooled = []
    for conv in block.conv_h:
        a = act_h(conv(x).squeeze(3))
        pooled.append(torch.nn.functional.max_pool1d(a, a.shape[2]).squeeze(2))
    return torch.cat(pooled, 1), act_v(block.conv_v(x)).flatten(1)


def caser_case():
    length, dim, n_h, n_v = pick(1, 2, 4), pick(1, 3, 5), pick(1, 2, 4), pick(1, 2)
    act_h, act_v = pick("relu", "relu", "gelu", "tanh", "sigmoid", "none"), pick(None, "relu", "tanh")
    bad_ctor = pick(*([None] * 8), "max_len", "act_h", "act_v")
    args = dict(max_len=length, dim=dim, n_h=n_h, n_v=n_v, act_h=act_h, act_v=act_v)
    if bad_ctor is not None:
        args[bad_ctor] = {"max_len": pick(0, -1, 2.0), "act_h": "swish", "act_v": "elu"}[bad_ctor]
    block, err = run(lambda: fnn.CaserConv(**args))
    if bad_ctor is not None:
        if not isinstance(err, ValueError):
            problems.append(f"CaserConv({args}): expected a ValueError, got {err!r}")
        return "ctor"
    if err is not None:
        problems.append(f"CaserConv({args}): {err!r}")
        return "ctor"
    batch = pick(0, 1, 3)
    form = pick("3d", "3d", "4d", "wrong_L", "wrong_d", "2d")
    shape = {"3d": (batch, length, dim), "4d": (batch, 1, length, dim), "wrong_L": (batch, length + 1, dim),
             "wrong_d": (batch, length, dim + 1), "2d": (length, dim)}[form]
    grad = pick(True, False)
    E, E_ref = leaf(torch.randn(shape), grad)
    desc = f"{args} E={shape}"
    if form in ("wrong_L", "wrong_d", "2d"):  # fastrec names the shape it wants: a clean exception
        _, err = run(lambda: block(E))
        if not isinstance(err, (ValueError, TypeError, RuntimeError)):
            problems.append(f"CaserConv {desc}: expected an error naming the shape, got {err!r}")
        return form
    compare("CaserConv", desc, lambda: block(E), lambda: caser_reference(block, E_ref), [(E, E_ref)] if grad else [])
    return form


kinds = [mha_case, rnn_case, cell_case, dropout_case, conv_case, caser_case]
for i in range(n_cases):
    torch.manual_seed(i)
    fn = kinds[i % len(kinds)]
    try:
        label = fn()
    except Exception:
        problems.append(f"{fn.__name__} case {i}: the harness raised {traceback.format_exc(limit=2)}")
        label = "harness"
    key = f"{fn.__name__}:{label}"
    counts[key] = counts.get(key, 0) + 1
print(json.dumps({"problems": problems, "counts": counts}))
"""


def test_fuzz_modules_against_torch():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FUZZ_SCRIPT), "20261206", str(CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(report["counts"].values()) == CASES
    assert not report["problems"], "\n".join(report["problems"][:30])

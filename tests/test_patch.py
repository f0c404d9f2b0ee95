"""``fastrec.patch`` / ``unpatch`` on models written the way people write them, built from plain
``torch.nn`` modules: a small CNN (conv 3x3 pad 1 -> ReLU -> 2x2 max-pool, twice)
in an ``nn.Sequential``, a Conv1d stack with ModuleLists looped in forward, a module reused twice,
nested submodules, eval mode and frozen parameters, a GRU4Rec and a SASRec-like model.

Reference and bound: the unpatched model in float64 (``ref``) and in fp32 (``pt``); the patched
model runs in fp32 on each backend (``torch``, ``cpp``, ``triton`` — the interpreter here; a
backend that cannot run is skipped with its reason). Outputs, the loss and the gradient of every
trainable parameter (random upstream gradient plus the loss) are within ``‖fast − ref‖ / ‖ref‖
<= 2e-5`` or twice the fp32 torch model's own error, whichever is larger (docs/testing.md's fp32 bound
for a whole model, as tests/test_nn_attention.py's ``assert_model_close``). After ``.double()``
the patched model is held to float64 rounding (1e-12). Structural checks are exact: the same
parameter objects (so an optimizer built before ``patch`` steps the patched model), identical
``state_dict`` keys and ``named_parameters`` names, the classes ``unpatch`` restores (after which
the model computes bitwise what the untouched fp32 copy computes), and the report's rows.
``fastrec.stats()`` shows that the fused calls ran on the forced backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
from attention_reference import assert_rel_close, device_of, run_forced

import fastrec
from fastrec import nn as fnn
from fastrec.ops import encoder as encoder_ops
from fastrec.patch import SequentialConvBlock

MODEL_FP32_BOUND = 2e-5


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request):
    """Each backend, forced; skipped with the reason when it cannot run here."""
    yield from run_forced(request.param)


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    """torch initialises some biases to zero; make every parameter generic."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def assert_model_close(fast, pt, ref, name):
    """fp32 ``fast`` vs float64 ``ref``: within MODEL_FP32_BOUND or twice fp32 torch's error."""
    fast, pt, ref = (t.detach().cpu().double() for t in (fast, pt, ref))
    err_pt = (pt - ref).norm().item() / ref.norm().item()
    assert_rel_close(fast, ref, f"{name} (fp32 torch is at {err_pt:.2e})", bound=max(MODEL_FP32_BOUND, 2 * err_pt))


# --------------------------------------------------------------------------- models
class SeedCNN(torch.nn.Module):
    """A small CNN: two conv 3x3 pad 1 -> ReLU -> 2x2 max-pool stages, a head."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 12, kernel_size=3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12 * 3 * 3, classes))

    def forward(self, x):
        return self.head(self.features(x))


class Stage(torch.nn.Module):
    """A nested submodule holding a Sequential chain and a Conv1d that is not in a chain."""

    def __init__(self, channels):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Conv1d(channels, channels, 3, padding=1), torch.nn.Tanh())
        self.mix = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return self.mix(self.block(x)) + x


class BehaviorConv1d(torch.nn.Module):
    """Conv1d over a behaviour sequence: a GELU chain with a 1-D pool, a ModuleList of stages
    looped in forward (one stage frozen), the same Sequential called twice, a pool the fused
    kernels do not cover (stride != kernel: conv + act fuse, the pool stays) and a Sigmoid chain."""

    def __init__(self, features=4, channels=6):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv1d(features, channels, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool1d(2)
        )
        self.stages = torch.nn.ModuleList([Stage(channels) for _ in range(2)])
        self.shared = torch.nn.Sequential(torch.nn.Conv1d(channels, channels, 3, padding=1), torch.nn.ReLU())
        self.tail = torch.nn.Sequential(
            torch.nn.Conv1d(channels, channels, 3),
            torch.nn.ReLU(),
            torch.nn.MaxPool1d(3, stride=2),
            torch.nn.Conv1d(channels, 2, 1),
            torch.nn.Sigmoid(),
        )
        self.stages[1].requires_grad_(False)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = self.shared(self.shared(x))
        return self.tail(x).flatten(1)


class GRU4Rec(torch.nn.Module):
    """GRU4Rec as people write it: embedding -> GRU -> projection onto the item embeddings."""

    def __init__(self, items=30, dim=16, hidden=12):
        super().__init__()
        self.emb = torch.nn.Embedding(items, dim, padding_idx=0)
        self.gru = torch.nn.GRU(dim, hidden, num_layers=2, batch_first=True)
        self.out = torch.nn.Linear(hidden, dim)

    def forward(self, seq):
        h, _ = self.gru(self.emb(seq))
        return self.out(h) @ self.emb.weight.T


class SASRecLike(torch.nn.Module):
    """SASRec from torch modules: item + learned positions, TransformerEncoderLayers in a
    ModuleList looped with a causal mask, a MultiheadAttention called twice, tied output."""

    def __init__(self, items=30, length=8, dim=16, heads=2):
        super().__init__()
        self.emb = torch.nn.Embedding(items, dim, padding_idx=0)
        self.pos = torch.nn.Embedding(length, dim)
        self.layers = torch.nn.ModuleList(
            [
                torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=24, dropout=0.0, batch_first=True)
                for _ in range(2)
            ]
        )
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, seq):
        length = seq.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu(1)
        x = self.emb(seq) + self.pos(torch.arange(length, device=seq.device))
        for layer in self.layers:
            x = layer(x, src_mask=causal)
        for _ in range(2):
            x = x + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        return x @ self.emb.weight.T


def _cnn():
    return SeedCNN(), lambda: torch.randn(3, 3, 12, 12), torch.randint(0, 5, (3,))


def _conv1d():
    return BehaviorConv1d(), lambda: torch.randn(3, 4, 22), torch.randint(0, 2 * 3, (3,))


def _gru4rec():
    return GRU4Rec(), lambda: torch.randint(1, 30, (3, 7)), torch.randint(1, 30, (3,))


def _sasrec():
    model = SASRecLike()
    model.pos.weight.requires_grad_(False)
    return model, lambda: torch.randint(1, 30, (3, 8)), torch.randint(1, 30, (3,))


MODELS = {"cnn": _cnn, "conv1d": _conv1d, "gru4rec": _gru4rec, "sasrec": _sasrec}


def step(model, x, target, grad_out):
    """Output, cross-entropy loss and the .grad of every trainable parameter after one backward
    of ``sum(out * grad_out) + loss`` (a random upstream gradient plus the loss's)."""
    param = next(model.parameters())
    x = x.to(param.device, param.dtype) if x.is_floating_point() else x.to(param.device)
    model.zero_grad(set_to_none=True)
    out = model(x)
    logits = out[:, -1] if out.dim() == 3 else out
    loss = torch.nn.functional.cross_entropy(logits, target.to(param.device))
    ((out * grad_out.to(out.device, out.dtype)).sum() + loss).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.detach(), loss.detach(), grads


def module_types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ["patch_then_to", "to_then_patch"])
def test_patched_model_matches_unpatched(backend, name, order):
    model, make_input, target = MODELS[name]()
    perturb(model)
    if name == "conv1d":
        model.eval()
    ref, pt = copy.deepcopy(model).double(), copy.deepcopy(model)
    types, keys = module_types(model), list(model.state_dict())
    names_ids = [(n, id(p)) for n, p in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    device = device_of(backend)
    if order == "to_then_patch":
        model.to(device)
    report = fastrec.patch(model)
    model.to(device)
    assert report.replaced or report.fused
    assert [(n, id(p)) for n, p in model.named_parameters()] == names_ids
    assert list(model.state_dict()) == keys
    assert all(m.training == (name != "conv1d") for m in model.modules())

    x = make_input()
    grad_out = torch.randn(pt(x).shape)
    fastrec.stats(reset=True)
    out, loss, grads = step(model, x, target, grad_out)
    ran = set(fastrec.stats())
    # On the CPU a training encoder layer is recorded as torch's layer forward: its attention and
    # dropouts, recorded on their own, are the forced backend's.
    composed = {key for key in ran if key[:3:2] == ("encoder_layer", encoder_ops.TRAIN_CPU_REASON)}
    assert bool(composed) == (name == "sasrec" and backend != "triton")
    assert {b for _, b, _ in ran - composed} == {backend}
    ref_out, ref_loss, ref_grads = step(ref, x.double() if x.is_floating_point() else x, target, grad_out)
    pt_out, pt_loss, pt_grads = step(pt, x, target, grad_out)
    assert_model_close(out, pt_out, ref_out, "output")
    assert_model_close(loss, pt_loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys()
    for pname, grad in ref_grads.items():
        assert_model_close(grads[pname], pt_grads[pname], grad, f"grad of {pname}")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen) and (frozen or name not in ("conv1d", "sasrec"))

    optimizer.step()  # built before patch: it updates the tensors the patched model reads
    torch.optim.SGD(pt.parameters(), lr=1e-2, momentum=0.9).step()
    assert optimizer.state and all(p in optimizer.state for p in model.parameters() if p.requires_grad)
    for (pname, p), q in zip(model.named_parameters(), pt.parameters(), strict=True):
        assert_rel_close(p, q, f"{pname} after one SGD step", bound=1e-6)

    model.cpu()
    fastrec.unpatch(model)
    assert module_types(model) == types
    assert [(n, id(p)) for n, p in model.named_parameters()] == names_ids
    with torch.no_grad():
        for p, q in zip(model.parameters(), pt.parameters(), strict=True):
            p.copy_(q)
        assert torch.equal(model(x), pt(x))


def test_seed_cnn_chains_fuse_and_report():
    model = SeedCNN()
    report = fastrec.patch(model)
    assert report.fused == [
        ("features.0..2", "Conv2d -> ReLU -> MaxPool2d"),
        ("features.3..5", "Conv2d -> ReLU -> MaxPool2d"),
    ]
    assert report.replaced == [] and report.left == []
    assert "features.0..2" in str(report) and "ConvBlock" in str(report)
    assert isinstance(model.features[0], fnn.ConvBlock) and type(model.features[0]) is SequentialConvBlock
    assert [type(m) for m in model.features[1:3]] == [torch.nn.Identity, torch.nn.Identity]
    assert (model.features[0].act, model.features[0].pool) == ("relu", (2, 2))
    assert set(model.features.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    fastrec.stats(reset=True)
    with fastrec.use_backend("torch"):
        model(torch.randn(2, 3, 12, 12))
    assert fastrec.stats() == {("conv", "torch", ""): 2}  # one fused call per chain
    assert fastrec.unpatch(model) == 2
    assert [type(m) for m in model.features] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d] * 2


def test_conv1d_model_report_lists_chains_and_swaps():
    model = BehaviorConv1d()
    report = fastrec.patch(model)
    assert report.fused == [
        ("stem.0..2", "Conv1d -> GELU -> MaxPool1d"),
        ("stages.0.block.0..1", "Conv1d -> Tanh"),
        ("stages.1.block.0..1", "Conv1d -> Tanh"),
        ("shared.0..1", "Conv1d -> ReLU"),
        ("tail.0..1", "Conv1d -> ReLU"),
        ("tail.3..4", "Conv1d -> Sigmoid"),
    ]
    assert sorted(n for n, _, _ in report.replaced) == ["stages.0.mix", "stages.1.mix"]
    assert type(model.tail[2]) is torch.nn.MaxPool1d  # stride != kernel: left to torch
    assert fastrec.unpatch(model) == 8


def test_patch_after_patch_and_after_double():
    model = perturb(SeedCNN())
    ref = copy.deepcopy(model).double()
    fastrec.patch(model)
    assert fastrec.patch(model).fused == []  # already fused: nothing more to do
    model.double()
    assert model.features[0].conv.weight is model.features[0].weight
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with fastrec.use_backend("torch"):
        assert_rel_close(model(x), ref(x), "float64 output", bound=1e-12)
    fastrec.unpatch(model)
    assert model.features[0].weight.dtype == torch.float64 and type(model.features[0]) is torch.nn.Conv2d


def test_family_keywords_leave_modules_and_say_why():
    model = torch.nn.ModuleDict({"cnn": SeedCNN(), "gru": GRU4Rec(), "sas": SASRecLike()})
    report = fastrec.patch(model, conv=False, rnn=False)
    assert report.fused == []
    assert sorted((n, why) for n, _, why in report.left) == [
        ("cnn.features.0", "conv=False"),
        ("cnn.features.3", "conv=False"),
        ("gru.gru", "rnn=False"),
    ]
    attention = ["sas.attn", "sas.layers.0", "sas.layers.0.self_attn", "sas.layers.1", "sas.layers.1.self_attn"]
    assert sorted(n for n, _, _ in report.replaced) == attention
    assert type(model["sas"].attn) is fnn.MultiheadAttention and type(model["gru"].gru) is torch.nn.GRU
    assert fastrec.unpatch(model) == 5
    report = fastrec.patch(model, attention=False)
    assert [n for n, _ in report.fused] == ["cnn.features.0..2", "cnn.features.3..5"]
    assert [n for n, _, _ in report.replaced] == ["gru.gru"]
    assert sorted((n, why) for n, _, why in report.left) == [(n, "attention=False") for n in attention]


def test_chains_the_kernels_do_not_cover_are_not_fused():
    hooked = torch.nn.Conv2d(2, 3, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding_mode="reflect", padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, 3),
        torch.nn.GELU(approximate="tanh"),
        hooked,
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, ceil_mode=True),
    )
    ref = copy.deepcopy(model)
    report = fastrec.patch(model)
    assert report.fused == [("6..7", "Conv2d -> ReLU")]
    assert type(model[8]) is torch.nn.MaxPool2d and type(model[4]) is fnn.Conv2d
    x = torch.randn(2, 2, 11, 9)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_compile_after_patch():
    torch._dynamo.reset()
    model = torch.nn.ModuleDict({"cnn": perturb(SeedCNN()), "gru": perturb(GRU4Rec())})
    ref = copy.deepcopy(model).double()
    fastrec.patch(model)

    def run(m, img, seq):
        return m["cnn"](img), m["gru"](seq)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    img, seq = torch.randn(2, 3, 12, 12, requires_grad=True), torch.randint(1, 30, (2, 5))
    with torch._dynamo.config.patch(allow_rnn=True):
        outs = compiled(model, img, seq)
    ref_outs = run(ref, img.detach().double().requires_grad_(), seq)
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, [img, *model.parameters()], grads_out)
    want = torch.autograd.grad(ref_outs, [*ref.parameters()], [g.double() for g in grads_out])
    for o, r in zip(outs, ref_outs, strict=True):
        assert_rel_close(o, r, "compiled output")
    for (pname, _), g, r in zip(model.named_parameters(), got[1:], want, strict=True):
        assert_rel_close(g, r, f"compiled grad of {pname}")


def test_state_dict_round_trips_and_deepcopy():
    model = perturb(SeedCNN())
    plain = copy.deepcopy(model)
    fastrec.patch(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state.keys() == plain.state_dict().keys()
    fresh = perturb(SeedCNN())
    fastrec.patch(fresh)
    fresh.load_state_dict(plain.state_dict())  # strict: an unpatched checkpoint loads into a patched model
    plain.load_state_dict(state)  # and the other way
    twin = copy.deepcopy(fresh)
    assert twin.features[0].conv.weight is twin.features[0].weight is not fresh.features[0].weight
    x = torch.randn(2, 3, 12, 12)
    with fastrec.use_backend("torch"):
        for m in (fresh, twin):
            torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-5)
    fastrec.unpatch(twin)
    assert twin.features[0].weight is not fresh.features[0].weight and type(twin.features[0]) is torch.nn.Conv2d


def test_new_parameter_objects_on_conversion_reach_the_conv():
    """With torch's overwrite-on-conversion flag, ``.double()`` makes new parameter objects;
    the fused block and, after ``unpatch``, the conv hold the new ones."""
    model = perturb(SeedCNN())
    fastrec.patch(model)
    old = model.features[0].weight
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    new = model.features[0].weight
    assert new is not old and new.dtype == torch.float64
    fastrec.unpatch(model)
    assert model.features[0].weight is new


def test_conv_block_from_conv1d_chain_matches_torch(backend):
    seq = perturb(torch.nn.Sequential(torch.nn.Conv1d(3, 5, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool1d(2)))
    block = fnn.ConvBlock.from_modules(*seq)
    assert block.conv is seq[0] and (block.act, block.pool) == ("gelu", (2,))
    x = torch.randn(2, 3, 13, requires_grad=True)
    ref = copy.deepcopy(seq).double()
    x_ref = x.detach().double().requires_grad_()
    y, y_ref = block(x), ref(x_ref)
    assert_rel_close(y, y_ref, "output")
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, *seq.parameters()), grad)
    want = torch.autograd.grad(y_ref, (x_ref, *ref.parameters()), grad.double())
    for name, g, r in zip(("input", "weight", "bias"), got, want, strict=True):
        assert_rel_close(g, r, f"grad of {name}")
    with pytest.raises(TypeError, match="pool must be a torch.nn.MaxPool1d"):
        fnn.ConvBlock.from_modules(seq[0], seq[1], torch.nn.MaxPool2d(2))


def test_patched_model_with_dropout_trains_like_torch_by_default():
    """The default dropout stream draws torch's masks on the CPU: a patched SASRec-like model in
    training mode, with attention, residual and feed-forward dropout on, gives the unpatched
    model's output, loss and every gradient under the same seed (and the Philox stream does not)."""
    model, make_input, target = _sasrec()
    perturb(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.2
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.2
    ref, pt = copy.deepcopy(model).double(), copy.deepcopy(model)
    fastrec.patch(model)
    x = make_input()
    grad_out = torch.randn(pt(x).shape)
    results = []
    for m in (model, ref, pt):
        torch.manual_seed(3)
        results.append(step(m, x, target, grad_out))
    (out, loss, grads), (ref_out, ref_loss, ref_grads), (pt_out, pt_loss, pt_grads) = results
    assert_model_close(out, pt_out, ref_out, "output")
    assert_model_close(loss, pt_loss, ref_loss, "loss")
    for pname, grad in ref_grads.items():
        assert_model_close(grads[pname], pt_grads[pname], grad, f"grad of {pname}")
    with fastrec.use_dropout_stream("fastrec"):
        torch.manual_seed(3)
        own, _, _ = step(model, x, target, grad_out)
    assert (own - pt_out).norm() > 1e-2 * pt_out.norm()

"""``patch(model)``: swap supported ``torch.nn`` modules for their fastrec twins, in place.

A swap changes only the module's class (fastrec modules subclass torch's and override only
``forward``), so parameter tensors, optimizer state, hooks and ``state_dict`` keys stay as
they were. ``unpatch`` swaps back.

Inside an ``nn.Sequential``, a ``Conv2d -> act -> MaxPool2d`` chain (or ``Conv1d -> act ->
MaxPool1d``, or a conv and its activation alone) becomes one fused call: the conv's slot holds a
``SequentialConvBlock`` (a ``fastrec.nn.ConvBlock``) that registers the conv's own parameter
objects as ``weight``/``bias``, and the act/pool slots hold ``nn.Identity``. The Sequential keeps
its indices, so ``state_dict`` keys and ``named_parameters`` are those of the unpatched model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrec import nn as fnn
from fastrec.nn.conv import chain_options

# torch class -> (fastrec family flag, fastrec class). Families add their modules here.
REPLACEMENTS: dict[type[torch.nn.Module], tuple[str, type[torch.nn.Module]]] = {
    torch.nn.MultiheadAttention: ("attention", fnn.MultiheadAttention),
    torch.nn.TransformerEncoderLayer: ("attention", fnn.TransformerEncoderLayer),
    torch.nn.RNN: ("rnn", fnn.RNN),
    torch.nn.GRU: ("rnn", fnn.GRU),
    torch.nn.LSTM: ("rnn", fnn.LSTM),
    torch.nn.Conv1d: ("conv", fnn.Conv1d),
    torch.nn.Conv2d: ("conv", fnn.Conv2d),
    torch.nn.RNNCell: ("rnn", fnn.RNNCell),
    torch.nn.GRUCell: ("rnn", fnn.GRUCell),
    torch.nn.LSTMCell: ("rnn", fnn.LSTMCell),
}


_CHAIN_ACTS = (torch.nn.ReLU, torch.nn.GELU, torch.nn.Tanh, torch.nn.Sigmoid)
_CHAIN_POOLS = {torch.nn.Conv1d: torch.nn.MaxPool1d, torch.nn.Conv2d: torch.nn.MaxPool2d}
_CHAIN_CONVS = {torch.nn.Conv1d: torch.nn.Conv1d, fnn.Conv1d: torch.nn.Conv1d}
_CHAIN_CONVS.update({torch.nn.Conv2d: torch.nn.Conv2d, fnn.Conv2d: torch.nn.Conv2d})


class SequentialConvBlock(fnn.ConvBlock):
    """The fused ``conv -> act [-> pool]`` chain that ``patch`` puts in the conv's slot of an
    ``nn.Sequential``. The conv's parameter objects are registered here as ``weight``/``bias`` (the
    keys the slot had); the conv itself and the replaced act/pool modules are kept aside, not as
    submodules, for the geometry and for ``unpatch``."""

    def __init__(self, conv: torch.nn.Module, act: torch.nn.Module, pool: torch.nn.Module | None) -> None:
        torch.nn.Module.__init__(self)
        self.act, self.pool = chain_options(conv, act, pool)
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        object.__setattr__(self, "chain", (conv, act, pool))

    @property
    def conv(self) -> torch.nn.Module:
        """The original conv, holding this block's current parameter objects."""
        conv = self.chain[0]
        conv._parameters["weight"], conv._parameters["bias"] = self.weight, self.bias
        return conv

    def extra_repr(self) -> str:
        return f"{type(self.conv).__name__}({self.conv.extra_repr()}), {super().extra_repr()}"

    def restored(self) -> list[torch.nn.Module]:
        """The modules this block replaced: the conv (with the current parameters), act, pool."""
        return [m for m in (self.conv, *self.chain[1:]) if m is not None]


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _fusable(conv: torch.nn.Module, pool: torch.nn.Module) -> bool:
    """Whether the fused kernels take ``pool`` after ``conv`` (stride == kernel, no padding, ...)."""
    try:
        chain_options(conv, None, pool)
    except (TypeError, ValueError):
        return False
    return True


def _fuse_chains(seq: torch.nn.Sequential, prefix: str, report: PatchReport) -> None:
    """Replace each fusable ``conv -> act [-> pool]`` run of ``seq`` in place."""
    mods = list(seq._modules.items())
    i = 0
    while i < len(mods) - 1:
        conv, act = mods[i][1], mods[i + 1][1]
        base = _CHAIN_CONVS.get(type(conv))
        ok_act = type(act) in _CHAIN_ACTS and not (isinstance(act, torch.nn.GELU) and act.approximate != "none")
        if base is None or not ok_act or conv.padding_mode != "zeros" or _hooked(conv) or _hooked(act):
            i += 1
            continue
        pool = mods[i + 2][1] if i + 2 < len(mods) else None
        if pool is not None and (type(pool) is not _CHAIN_POOLS[base] or _hooked(pool) or not _fusable(conv, pool)):
            pool = None  # conv + act still fuse; the pool stays a module of its own
        if type(conv) is not base:
            conv.__class__ = base
        block = SequentialConvBlock(conv, act, pool).train(conv.training)
        names = [name for name, _ in mods[i : i + (3 if pool is not None else 2)]]
        seq._modules[names[0]] = block
        for name in names[1:]:
            seq._modules[name] = torch.nn.Identity().train(seq._modules[name].training)
        chain = " -> ".join(type(m).__name__ for m in block.chain if m is not None)
        report.fused.append((f"{prefix}{names[0]}..{names[-1]}", chain))
        i += len(names)


@dataclass
class PatchReport:
    """What ``patch`` replaced, the chains it fused (Sequential slots, modules) and what it left,
    with the reason; ``str()`` prints it as a table."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (name, from, to)
    left: list[tuple[str, str, str]] = field(default_factory=list)  # (name, class, why)
    fused: list[tuple[str, str]] = field(default_factory=list)  # (slots, chain)

    def __str__(self) -> str:
        rows = [("module", "class", "result")]
        rows += [(n, a, f"-> {b}") for n, a, b in self.replaced]
        rows += [(n, c, "-> fastrec.nn.ConvBlock (fused)") for n, c in self.fused]
        rows += [(n, a, f"kept: {why}") for n, a, why in self.left]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def patch(model: torch.nn.Module, *, attention: bool = True, rnn: bool = True, conv: bool = True) -> PatchReport:
    """Swap every supported module of ``model`` (itself included) for its fastrec twin, and fuse
    the ``conv -> act [-> max-pool]`` chains of its ``nn.Sequential`` containers (``conv=True``).
    ``attention``/``rnn``/``conv`` False leave that family's modules as they are (reported)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"attention": attention, "rnn": rnn, "conv": conv}
    report = PatchReport()
    if conv:
        for name, module in list(model.named_modules()):
            if type(module) is torch.nn.Sequential:
                _fuse_chains(module, f"{name}." if name else "", report)
    fastrec_classes = {cls for _, cls in REPLACEMENTS.values()}
    for name, module in model.named_modules():
        name = name or "<root>"
        cls = type(module)
        if cls in fastrec_classes:
            continue
        if cls in REPLACEMENTS:
            family, twin = REPLACEMENTS[cls]
            if not enabled[family]:
                report.left.append((name, cls.__name__, f"{family}=False"))
                continue
            module.__class__ = twin
            report.replaced.append((name, f"torch.nn.{cls.__name__}", f"fastrec.nn.{twin.__name__}"))
        else:
            base = next((b for b in REPLACEMENTS if issubclass(cls, b)), None)
            if base is not None:
                why = f"subclass of torch.nn.{base.__name__} that fastrec does not know"
                report.left.append((name, cls.__name__, why))
    return report


def unpatch(model: torch.nn.Module) -> int:
    """Restore plain torch modules on every fastrec module of ``model`` (fused chains put back
    into their Sequential slots); returns how many modules were restored."""
    back = {cls: base for base, (_, cls) in REPLACEMENTS.items()}
    restored = 0
    for module in list(model.modules()):
        if type(module) is not torch.nn.Sequential:
            continue
        names = list(module._modules)
        for i, name in enumerate(names):
            block = module._modules[name]
            if isinstance(block, SequentialConvBlock):
                for slot, original in zip(names[i:], block.restored(), strict=False):
                    module._modules[slot] = original
                restored += 1
    for module in model.modules():
        base = back.get(type(module))
        if base is not None:
            module.__class__ = base
            restored += 1
    return restored

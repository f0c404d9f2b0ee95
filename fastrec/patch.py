"""``patch(model)``: swap supported ``torch.nn`` modules for their fastrec twins, in place.

A swap changes only the module's class (fastrec modules subclass torch's and override only
``forward``), so parameter tensors, optimizer state, hooks and ``state_dict`` keys stay as
they were. ``unpatch`` swaps back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrec import nn as fnn

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


@dataclass
class PatchReport:
    """What ``patch`` replaced and what it left, with the reason."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (name, from, to)
    left: list[tuple[str, str, str]] = field(default_factory=list)  # (name, class, why)

    def __str__(self) -> str:
        rows = [("module", "class", "result")]
        rows += [(n, a, f"-> {b}") for n, a, b in self.replaced]
        rows += [(n, a, f"kept: {why}") for n, a, why in self.left]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def patch(model: torch.nn.Module, *, attention: bool = True, rnn: bool = True, conv: bool = True) -> PatchReport:
    """Swap every supported module of ``model`` (itself included) for its fastrec twin."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"attention": attention, "rnn": rnn, "conv": conv}
    report = PatchReport()
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
    """Restore plain torch classes on every fastrec module of ``model``; returns how many."""
    back = {cls: base for base, (_, cls) in REPLACEMENTS.items()}
    restored = 0
    for module in model.modules():
        base = back.get(type(module))
        if base is not None:
            module.__class__ = base
            restored += 1
    return restored

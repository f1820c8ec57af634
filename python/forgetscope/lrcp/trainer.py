"""LRCP as a transformers ``TrainerCallback``: attaches the projection hooks to the Trainer's optimizer
at ``on_train_begin`` and removes them at ``on_train_end``."""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

from ..exceptions import UsageError
from .hook import LRCP
from .subspace import ProtectedSubspaces, load_subspaces


class LRCPCallback(TrainerCallback):
    """``Trainer(..., callbacks=[LRCPCallback(subspaces)])``.

    Args:
        subspaces: :class:`ProtectedSubspaces` or the path of a saved artefact.
        alpha: 1 = hard projection; 0 < α < 1 soft; 0 = off.
        **kw: passed to :class:`LRCP` (``master_fp32``, ``strict``).

    The constraint is relative to the model's weights when training begins (PEFT models: the LoRA A
    matrices are projected then). ``self.lrcp`` is the attached :class:`LRCP` during training.
    """

    def __init__(self, subspaces: Any, *, alpha: float = 1.0, **kw: Any) -> None:
        self.subspaces: ProtectedSubspaces = subspaces if isinstance(subspaces, ProtectedSubspaces) \
            else load_subspaces(subspaces)
        self.alpha = alpha
        self.kw = kw
        self.lrcp: Optional[LRCP] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise UsageError("LRCPCallback needs the Trainer's model and optimizer at on_train_begin")
        self.lrcp = LRCP(model, self.subspaces, alpha=self.alpha, **self.kw).attach(optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lrcp is not None:
            self.lrcp.detach()

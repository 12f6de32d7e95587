"""Owned hooks: every hook is registered through :class:`HookManager` and removed on exit."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class StopForward(Exception):
    """Raised by a hook once a pass has seen what it needs (the rest of the forward is skipped)."""


class HookManager:
    """Registers forward (pre-)hooks and removes all of them when the ``with`` block ends.

    >>> with HookManager() as hooks:
    ...     hooks.add_input_hook(layer.o_proj, lambda module, x: ...)
    ...     model(**batch)
    # all hooks are gone here, also after an exception
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add_input_hook(self, module: nn.Module, fn: Callable[[nn.Module, Any], None]) -> None:
        """Call ``fn(module, first_positional_input)`` before every forward of ``module``."""

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            fn(mod, args[0])

        self._handles.append(module.register_forward_pre_hook(pre_hook))

    def add_call_hook(self, module: nn.Module, fn: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]) -> None:
        """Call ``fn(module, args, kwargs)`` before every forward of ``module`` (all of its arguments)."""

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(mod, args, kwargs)

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def add_forward_hook(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def __len__(self) -> int:
        return len(self._handles)

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove_all()


def count_hooks(model: nn.Module) -> int:
    """Number of forward and forward-pre hooks attached anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

import pytest
import torch

from seap.model.hooks import HookManager, count_hooks


def test_hooks_removed_after_success_and_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    seen = []
    with HookManager() as hooks:
        hooks.add_input_hook(model[1], lambda m, x: seen.append(x.shape))
        assert count_hooks(model) == 1
        model(torch.randn(4, 3))
    assert seen == [torch.Size([4, 3])]
    assert count_hooks(model) == 0

    with pytest.raises(RuntimeError, match="boom"):
        with HookManager() as hooks:
            hooks.add_input_hook(model[0], lambda m, x: None)
            hooks.add_forward_hook(model[1], lambda m, i, o: None)
            raise RuntimeError("boom")
    assert count_hooks(model) == 0

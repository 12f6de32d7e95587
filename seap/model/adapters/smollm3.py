"""SmolLM3 (``smollm3``): Llama layout in which some layers use no rotary embedding
(``no_rope_layers[i] == 0``; "NoPE" layers, every fourth by default), optionally with a
sliding window. Which layers rotate does not depend on the widths, so the surgery is the
Llama one; the flag list must cover every layer and hold only 0 and 1."""

from __future__ import annotations

from typing import Any

from seap.model.adapters.base import ArchitectureAdapter


class SmolLM3Adapter(ArchitectureAdapter):
    name = "smollm3"
    model_types = ("smollm3",)

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        flags = getattr(config, "no_rope_layers", None)
        if flags is not None and (len(flags) != config.num_hidden_layers or set(flags) - {0, 1}):
            self.refuse(config, f"no_rope_layers={flags!r}",
                        f"it must hold one 0 (no rotary embedding) or 1 per layer ({config.num_hidden_layers})")

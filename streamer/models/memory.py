"""What a loaded model weighs in this process: the figure a serving process reports as
`streamer_model_memory_bytes` and `streamer compress` records in its manifest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class _Tensor(Protocol):
    def numel(self) -> int: ...

    def element_size(self) -> int: ...


class _Module(Protocol):
    def parameters(self) -> Iterable[_Tensor]: ...

    def buffers(self) -> Iterable[_Tensor]: ...


def resident_bytes(model: _Module) -> int:
    """Bytes of a torch module's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)

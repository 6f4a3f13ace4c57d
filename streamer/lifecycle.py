"""`async with` for the long-lived parts (pools, servers) that have `start()` and `aclose()`."""

from __future__ import annotations

from typing import Self


class AsyncLifecycle:
    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

"""An asyncio event loop whose clock jumps to the next timer instead of sleeping.

Timing logic (rate limits, cooldowns, backoff) runs here in microseconds of real time and is
measured in virtual seconds, so tests neither sleep nor depend on how busy the machine is.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self._virtual_now = 0.0
        real_select = self._selector.select  # type: ignore[attr-defined]

        def select(timeout: float | None = None) -> list[Any]:
            events = real_select(0)
            if not events:
                # Every idle turn moves time on by at least a microsecond, as a real clock
                # would: code that re-arms a timer for a float-rounding remainder would
                # otherwise spin forever at one instant.
                self._virtual_now += max(timeout or 0.0, 1e-6)
            return events  # type: ignore[no-any-return]

        self._selector.select = select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self._virtual_now


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a fresh virtual-clock loop."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()

"""`Throttle`: say the first occurrence of something at once, then at most once per interval
with how many there were, so a device whose every frame is refused gets a line every few
seconds with a count instead of a line per frame (issue 17: 7,560 lines in 12 s)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class Throttle:
    """Per key: `hit` returns how many occurrences to report now (the first at once, then
    the count since the last report once `interval_s` has passed), or None to stay quiet.

    At most `max_keys` keys are tracked (the least recently reported is forgotten first), so
    a flood of distinct devices cannot grow it without bound.

    >>> now = [0.0]
    >>> t = Throttle(interval_s=10.0, clock=lambda: now[0])
    >>> [t.hit("dev1") for _ in range(3)]
    [1, None, None]
    >>> now[0] = 11.0
    >>> t.hit("dev1"), t.hit("dev2")
    (3, 1)
    """

    def __init__(self, interval_s: float = 10.0, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        if not interval_s > 0 or max_keys < 1:
            raise ValueError(f"interval_s={interval_s!r}, max_keys={max_keys!r}: expected > 0, >= 1")
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._state: OrderedDict[Hashable, list] = OrderedDict()  # key -> [last report, unreported]

    def hit(self, key: Hashable) -> int | None:
        now = self._clock()
        st = self._state.get(key)
        if st is None:
            self._state[key] = [now, 0]
            while len(self._state) > self.max_keys:
                self._state.popitem(last=False)
            return 1
        st[1] += 1
        if now - st[0] < self.interval_s:
            return None
        n, st[0], st[1] = st[1], now, 0
        self._state.move_to_end(key)
        return n

"""Host batches built ahead of the device: the loader's numpy work overlaps the running step."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence


class Prefetcher:
    """Builds the host batches of positions [(epoch, step), ...] in a background thread (queue of 2).

    Iterating yields (epoch, step, prepare(loader.get_batch(epoch, step))); an error in the thread (a bad data line)
    is raised in the iterating thread. Call `close()` when done, also after an early exit.
    """

    def __init__(self, loader, positions: Sequence[tuple[int, int]], prepare: Callable):
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.positions, self.loader, self.prepare = positions, loader, prepare
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for epoch, step in self.positions:
                if self.stop:
                    return
                self.q.put((epoch, step, self.prepare(self.loader.get_batch(epoch, step))))
        except BaseException as e:  # surface data errors in the main thread
            self.q.put(e)
        self.q.put(None)

    def __iter__(self) -> Iterator:
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self.stop = True
        while self.thread.is_alive():  # drain, so a producer blocked on a full queue sees `stop`
            try:
                self.q.get(timeout=0.1)
            except queue.Empty:
                pass

"""A thread pool that hands its results over in order: ``ordered_streams`` runs a stream
(an iterator) per task in worker threads and yields every item of every task in task order,
as if read one task after another in the caller's thread. pyarrow releases the GIL while it
decodes, so the reader decodes several row groups at once this way. Memory stays bounded
however big a task: each task runs at most a few items ahead of the consumer, and only a few
tasks are under way at once. A worker's exception is raised in the consumer, at the task's
place in the order, and a consumer that stops early (closes the generator, or raises) stops
the workers with it."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor


def ordered_streams(tasks: list, stream: Callable[..., Iterator], workers: int,
                    depth: int = 2) -> Iterator:
    """The items of ``stream(task)`` (an iterator) for every task, in task order, from
    ``workers`` threads with up to ``2 * workers + 1`` tasks under way, each at most
    ``depth`` items ahead of the consumer (bounded memory, however big a task)."""
    if workers <= 1:
        for task in tasks:
            yield from stream(task)
        return
    done = object()
    stop = threading.Event()

    def hand_over(out: queue.Queue, item) -> bool:
        """Put ``item`` once there is room; False when the consumer stopped instead (it
        may never take another item: a worker waiting for room would wait for ever)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(task, out: queue.Queue):
        try:
            for item in stream(task):
                if not hand_over(out, item):
                    return
            hand_over(out, done)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            hand_over(out, exc)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="batchfit-read")
    try:
        outs = deque()
        for task in tasks[:2 * workers + 1]:
            outs.append(queue.Queue(depth))
            pool.submit(run, task, outs[-1])
        started = len(outs)
        while outs:
            item = outs[0].get()
            if item is done:
                outs.popleft()
                if started < len(tasks):
                    outs.append(queue.Queue(depth))
                    pool.submit(run, tasks[started], outs[-1])
                    started += 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)

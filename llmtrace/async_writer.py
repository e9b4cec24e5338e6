"""AsyncTraceWriter: the background writer for asyncio code, without ever blocking the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from llmtrace.model import LLMTrace
from llmtrace.repository import TraceRepository
from llmtrace.writer import TraceWriter, WriterQueueFull, WriterStats


class AsyncTraceWriter:
    """:class:`~llmtrace.TraceWriter` for asyncio code: ``submit`` never blocks the event loop.

    Inserts run on the writer's thread, never on the loop. ``submit`` is a plain (non-async) call that only
    appends to the buffer, so a task cancelled after ``submit`` returned cannot lose that trace. With
    ``overflow="block"`` a full buffer makes ``submit`` raise :class:`~llmtrace.WriterQueueFull` at once (the
    loop must not block); ``await submit_wait(...)`` waits for room without blocking the loop instead.

    Takes the same arguments as :class:`~llmtrace.TraceWriter`.
    """

    POLL_INTERVAL = 0.005

    def __init__(self, repository: TraceRepository, **options: Any) -> None:
        self._writer = TraceWriter(repository, **options)

    def submit(self, trace: LLMTrace | Mapping[str, Any]) -> None:
        """Queue a trace and return at once (see :meth:`TraceWriter.submit`)."""
        self._writer.submit(trace, timeout=0)

    async def submit_wait(self, trace: LLMTrace | Mapping[str, Any], *, timeout: float | None = None) -> None:
        """Queue a trace, waiting (without blocking the loop) for room in a full buffer.

        Raises:
            WriterQueueFull: No room appeared within ``timeout`` seconds.
            WriterClosed: The writer is closed, or its thread stopped.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._writer.submit(trace, timeout=0)
                return
            except WriterQueueFull:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(self.POLL_INTERVAL)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait, off the event loop, until everything submitted so far is written or spooled."""
        return await asyncio.to_thread(self._writer.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> WriterStats:
        """Flush and stop; see :meth:`TraceWriter.close`. Cancelling the awaiting task does not stop the close."""
        return await asyncio.shield(asyncio.to_thread(self._writer.close, timeout))

    @property
    def stats(self) -> WriterStats:
        """See :attr:`TraceWriter.stats`."""
        return self._writer.stats

    async def __aenter__(self) -> AsyncTraceWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

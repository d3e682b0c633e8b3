"""``python -m gateway writer``: a writer of the Redis stream between gateways and writers
(``MES_QUEUE``). Run any number, on any machine that reaches Redis and the history
database, with the gateway's environment.

A writer is a gateway's writer without the gateway: a history writer process
(``storage/writer_process.py``) writes a spool slot of this process's own, which a
``Relay`` (``storage/queue.py``) fills from the stream and acknowledges as the writes
commit. Slots left by processes that died on this machine are written too (``adopt``).
SIGTERM or Ctrl-C: stop reading, write what was read (``GATEWAY_SHUTDOWN_GRACE``), then
acknowledge it; what is left is taken over by another writer, or by this one's next run.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path

from gateway.metrics import Metrics
from gateway.services import writer_config
from gateway.settings import ConfigError, Settings
from storage.queue import GROUP, STREAM, Relay
from storage.spool import Spool
from storage.writer import adopt
from storage.writer_process import WriterProcess

log = logging.getLogger("mes.writer")
REPORT_SECONDS = 60.0


async def run(settings: Settings) -> None:
    if not settings.queue_url:
        raise ConfigError(
            "MES_QUEUE is not set: a writer reads the Redis stream the gateways add records "
            "to (redis://host:port/0)."
        )
    spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
    spool.open()
    registry = Metrics()
    writer = WriterProcess(replace(writer_config(settings), queue=None), spool, registry)
    writer.start()
    relay = Relay(
        settings.queue_url,
        spool,
        writer.appended,
        batch_size=settings.capture_batch_size,
        claim_seconds=settings.queue_claim_seconds,
        retry_seconds=settings.capture_retry_seconds,
    )
    background = [
        asyncio.create_task(adopt(orphan, spool, registry, writer.appended))
        for orphan in spool.orphans()
    ]
    background.append(asyncio.create_task(_report(writer)))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info(
        "MES writer %s: reading %s in group %s, writing to the history database",
        relay.consumer,
        STREAM,
        GROUP,
    )
    try:
        await relay.run(stopping)
    finally:
        for task in background:
            task.cancel()
        await writer.close(settings.shutdown_grace_seconds)
        await relay.close()
        counts = writer.counters()
        log.info(
            "MES writer %s stopped: %d records written, %d acknowledged",
            relay.consumer,
            counts["records_written"],
            relay.acknowledged,
        )


async def _report(writer: WriterProcess) -> None:
    """A line now and then: what was written, and what waits."""
    last, then = 0, time.monotonic()
    while True:
        await asyncio.sleep(REPORT_SECONDS)
        written, now = writer.counters()["records_written"], time.monotonic()
        log.info(
            "written %d records (%.0f/s), %d read and waiting, stalled %.0f s",
            written,
            (written - last) / (now - then),
            writer.depth,
            writer.stalled_seconds,
        )
        last, then = written, now

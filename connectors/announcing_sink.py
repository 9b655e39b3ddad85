"""``AnnouncingSink``: an ``ObjectSink`` that tells the catalog and EventBridge about what landed.

It wraps any sink (S3 or the local lake), so the pipeline keeps one ``put_object`` call::

    sink = AnnouncingSink(S3Sink(...), catalog=GlueCatalog(...), events=EventBridgePublisher(...))

Order: the object lands first; only then is its partition registered and its event queued, so
nothing downstream ever hears of an object that is not there. Announcing never fails a landing:
the object is durable, and a replay of its WAL range would only land it again. A Glue failure is
logged and counted (the catalog retries that partition on its next call); EventBridge queues.
"""

from __future__ import annotations

import logging
from typing import Protocol

from connectors.base import LakeObject, LandedObject, ObjectSink, Partition
from connectors.errors import ConnectorError

log = logging.getLogger(__name__)


class PartitionCatalog(Protocol):
    async def start(self) -> None: ...

    async def partition_landed(self, partition: Partition) -> bool: ...

    async def close(self) -> None: ...


class LandedEvents(Protocol):
    async def start(self) -> None: ...

    def object_landed(self, obj: LakeObject, landed: LandedObject) -> None: ...

    async def close(self) -> None: ...


class AnnouncingSink:
    """Lands through ``sink``, then registers the partition and queues the landed-object event."""

    def __init__(
        self,
        sink: ObjectSink,
        *,
        catalog: PartitionCatalog | None = None,
        events: LandedEvents | None = None,
    ) -> None:
        self.sink = sink
        self.catalog = catalog
        self.events = events
        self.name = sink.name
        self.catalog_failures = 0

    async def start(self) -> None:
        await self.sink.start()
        if self.catalog is not None:
            await self.catalog.start()
        if self.events is not None:
            await self.events.start()

    async def put_object(self, obj: LakeObject) -> LandedObject:
        landed = await self.sink.put_object(obj)
        if self.catalog is not None:
            try:
                await self.catalog.partition_landed(obj.partition)
            except ConnectorError as exc:
                self.catalog_failures += 1
                log.warning("catalog: partition %s not registered yet: %s", obj.partition.prefix, exc)
        if self.events is not None:
            self.events.object_landed(obj, landed)
        return landed

    async def close(self) -> None:
        # Reverse order of start: announcements flush while the sink is still open.
        if self.events is not None:
            await self.events.close()
        if self.catalog is not None:
            await self.catalog.close()
        await self.sink.close()

"""Recording the micro-batches a step reads, without consuming anything the step would not."""

from __future__ import annotations

from typing import Any, Iterator


class RecordingIterator:
    """Passes a data iterator through, keeping the first `limit` items it yields."""

    def __init__(self, source: Iterator, limit: int):
        self.source, self.limit = source, limit
        self.items: list[Any] = []

    def __iter__(self) -> RecordingIterator:
        return self

    def __next__(self) -> Any:
        item = next(self.source)
        if len(self.items) < self.limit:
            self.items.append(item)
        return item

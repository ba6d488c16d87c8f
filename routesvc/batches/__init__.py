"""Batch mode: requests not needed in real time go through the providers' batch APIs.

``BatchQueue`` takes jobs from ``Router.complete``, keeps them in SQLite (``BatchStore``), groups
and sends them, polls the providers and charges each succeeded job once at the batch price.
"""

from routesvc.batches._queue import BatchQueue, build_batch_apis
from routesvc.batches._store import BatchStore

__all__ = ["BatchQueue", "BatchStore", "build_batch_apis"]

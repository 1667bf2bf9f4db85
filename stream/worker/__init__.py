"""The ``detect`` worker: two transactional consume-process-produce stages.

- ``RouteStage`` (group ``<group_id>``, ``route``) reads the input topics, validates records and
  forwards each series point to the repartition topic keyed by timeseriesId, so every series has
  exactly one owner whatever input partition its records came in on. Bad records go to the
  dead-letter topic with their original bytes.
- ``ScoreStage`` (group ``<group_id>.score``, ``score``) owns partitions of the repartition
  topic: per series event-time windows and a detector; each closed window yields one result
  record.

Both commit with Kafka transactions (``transaction``; ``Stage.commit`` lists the steps): what a
batch produced (results, dead letters, repartitioned records, snapshots) and the input offsets it
consumed become visible together or not at all. State recovery (snapshots + replay with
suppressed output) is explained in docs/decisions/0002-exactly-once.md and in ``checkpoint``.
The worker's own topics are made by ``topics``; ``supervision`` runs the stages and says whether
the worker is healthy; ``processes`` runs the score stage in child processes of the worker
(docs/decisions/0011-score-processes.md).
"""

from stream.worker.checkpoint import CheckpointedStage, Partition, read_state
from stream.worker.errors import TransactionLost, WorkerError
from stream.worker.route import RouteStage
from stream.worker.score import ScoreStage
from stream.worker.supervision import STAGES, Worker, resolve_instance_id
from stream.worker.topics import MAX_RECORD_BYTES, ensure_topics
from stream.worker.transaction import Stage

__all__ = [
    "MAX_RECORD_BYTES",
    "STAGES",
    "CheckpointedStage",
    "Partition",
    "RouteStage",
    "ScoreStage",
    "Stage",
    "TransactionLost",
    "Worker",
    "WorkerError",
    "ensure_topics",
    "read_state",
    "resolve_instance_id",
]

"""The Kafka runtime of ``anomstream detect``: configuration, routing, windowing, per-series state
and its snapshots, metrics, and the transactional worker (``stream.worker``)."""

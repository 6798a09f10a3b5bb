"""Operating the node: what runs it and what watches it.

- `node.ops.service` — ``msknode serve``: listener, worker and web as supervised processes;
- `node.ops.restart` — restart with backoff, the one policy of every supervisor;
- `node.ops.health` — the health report (database, disk, listener, broker, workers, queues);
- `node.ops.metrics` — Prometheus metrics;
- `node.ops.retention` — purging stored instances once their results were delivered.
"""

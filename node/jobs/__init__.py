"""Jobs: one per study and anatomy, recorded in the database, run by Celery workers.

- `node.jobs.lease` — the job table as a queue: claim by lease, finish or fail with bounded
  retries, the enqueue outbox, the sweeper, worker heartbeats;
- `node.jobs.runner` — one job: load its context, run the models, triage and result writers,
  publish the findings (SR, SEG, overlays) in one transaction, then super-resolution and the rest
  in a second one that marks the job done (`execute_job`, `ModelPipelineRunner`);
- `node.jobs.celery_tasks` — the Celery task (``msknode.run_job``, a thin wrapper of `execute_job`);
- `node.jobs.celery_app` — the Celery app built from the settings, queues, broker helpers;
- `node.jobs.worker` — ``msknode worker``: a Celery worker and the node's periodic loops.
"""

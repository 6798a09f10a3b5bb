"""Several processes ticking one PostgreSQL database at once create exactly one job per study."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import func, select

from node.db.database import Database
from node.db.schema import Job, JobInput, Series
from node.intake.completeness import tick
from node.intake.routing import load_rules
from support.index_rows import at, make_study, send_series

pytestmark = pytest.mark.integration

Q = 0.5
SQ = 0.5
STUDIES = 6
PROCESSES = 4


def _ticker(url: str, settings_json: str, start, results) -> None:
    """One process: its own engine, ticks at the same logical instants as the others."""
    from node.intake.completeness import tick
    from node.intake.routing import load_rules
    from node.settings import Settings

    cfg = Settings.model_validate_json(settings_json)
    rules = load_rules(cfg.routing_rules)
    db = Database(url, migrate=False)
    created = []
    for t in (0.3 + Q + SQ, 0.3 + Q + SQ, 2.0):
        start.wait()  # every process reads the same settled studies at the same moment
        for attempt in range(5):
            try:
                with db.session() as s:
                    created += tick(s, cfg, at(t), rules)
                break
            except Exception as e:  # a deadlock victim retries, as the periodic loop would next round
                if "deadlock" not in str(e).lower() or attempt == 4:
                    raise
    db.dispose()
    results.put(created)


def test_concurrent_processes_on_postgres_create_one_job_per_study(postgres_url, settings):
    pg_url = postgres_url
    cfg = settings.model_copy(update={"quiet_seconds": Q, "study_quiet_seconds": SQ, "database_url": pg_url})
    db = Database(pg_url)
    try:
        with db.session() as s:
            for _ in range(STUDIES):
                st = make_study(s, description="MR KNEE")
                send_series(s, st, description="localizer", count=3, now=at(0.0), number=1)
                send_series(s, st, description="Sag PD FSE FS", count=24, now=at(0.1), number=2, expected=24)
                send_series(s, st, description="Cor T1", count=20, now=at(0.2), number=3)
                send_series(s, st, description="Ax PD FS", count=20, now=at(0.3), number=4)
        with db.session() as s:  # every series complete; the studies settle at 0.3 + Q + SQ
            assert tick(s, cfg, at(0.3 + Q), load_rules(cfg.routing_rules)) == []
            assert s.scalar(select(func.count()).select_from(Series).where(Series.state == "complete")) == 4 * STUDIES
        ctx = mp.get_context("spawn")
        start = ctx.Barrier(PROCESSES)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_ticker, args=(pg_url, cfg.model_dump_json(), start, results)) for _ in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        created = [j for _ in procs for j in results.get(timeout=120)]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert len(created) == STUDIES and len(set(created)) == STUDIES
        with db.session() as s:
            per_study = s.execute(select(Job.study_id, func.count()).group_by(Job.study_id)).all()
            assert len(per_study) == STUDIES and all(n == 1 for _, n in per_study)
            assert s.scalar(select(func.count()).select_from(JobInput)) == 3 * STUDIES
            assert s.scalar(select(func.count()).select_from(Series).where(Series.state == "queued")) == 3 * STUDIES
            assert s.scalar(select(func.count()).select_from(Series).where(Series.role == "localizer")) == STUDIES
    finally:
        db.dispose()

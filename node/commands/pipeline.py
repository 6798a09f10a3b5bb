"""``msknode jobs [--json] | jobs retry ID``, ``msknode purge``, ``msknode routing check``."""

from __future__ import annotations

import json

from node.commands import database, print_json_or_empty


def register(sub) -> None:
    p = sub.add_parser("jobs", help="pipeline jobs (one per study and anatomy)")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per job")
    p.add_argument("--state", help="only jobs in this state (queued, processing, done, failed, dead, superseded)")
    p.add_argument("--study", metavar="STUDY_UID", help="only jobs of this study")
    p.add_argument("--limit", type=int, default=None, help="at most this many, newest first")
    p.set_defaults(func=_jobs)
    jobs_actions = p.add_subparsers(dest="jobs_action", metavar="ACTION")
    jobs_actions.required = False
    register_job_actions(jobs_actions)

    p = sub.add_parser("purge", help="purge stored instances whose results were delivered MSKNODE_RETENTION_DAYS ago")
    p.add_argument("--dry-run", action="store_true", help="list what would be purged, change nothing")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_purge)

    p = sub.add_parser("routing", help="routing rules")
    rsub = p.add_subparsers(dest="routing_action", metavar="ACTION")
    rsub.required = True
    c = rsub.add_parser("check", help="validate a rules file (default MSKNODE_ROUTING_RULES) and list its rules")
    c.add_argument("file", nargs="?", help="the rules file to check")
    c.add_argument("--table", metavar="FILE", help="also check a table of series and expected routes (vendor_series.toml format)")
    c.set_defaults(func=_routing_check)


def register_job_actions(actions) -> None:
    """Subcommands of ``msknode jobs``; ``retry`` is `node.jobs.retry_job` (job orchestration)."""
    r = actions.add_parser("retry", help="queue a failed or dead job again")
    r.add_argument("job_id", type=int, metavar="ID")
    r.set_defaults(func=_jobs_retry)


def job_rows(db, *, state: str | None = None, study_uid: str | None = None, limit: int | None = None) -> list[dict]:
    """Jobs as plain dicts (the ``msknode jobs --json`` objects), newest first."""
    from sqlalchemy import select

    from node.tables import Job, JobInput, Series, Study

    def iso(t):
        return t.isoformat() if t is not None else None

    with db.session() as s:
        q = select(Job, Study.study_uid).join(Study, Study.id == Job.study_id).order_by(Job.id.desc())
        if state:
            q = q.where(Job.state == state)
        if study_uid:
            q = q.where(Study.study_uid == study_uid)
        if limit:
            q = q.limit(limit)
        rows = s.execute(q).all()
        ids = [j.id for j, _ in rows]
        inputs: dict[int, list[dict]] = {i: [] for i in ids}
        if ids:
            for job_id, series_uid, role, used_by in s.execute(
                select(JobInput.job_id, Series.series_uid, JobInput.role, JobInput.used_by)
                .join(Series, Series.id == JobInput.series_id)
                .where(JobInput.job_id.in_(ids))
                .order_by(JobInput.job_id, Series.series_number, Series.id)
            ):
                inputs[job_id].append({"series_uid": series_uid, "role": role, "used_by": used_by})
        return [
            {
                "id": j.id,
                "study_uid": study_uid_,
                "pipeline": j.pipeline,
                "state": j.state,
                "input_series": inputs[j.id],
                "supersedes_job_id": j.supersedes_job_id,
                "input_fingerprint": j.input_fingerprint,
                "queue": j.queue,
                "attempts": j.attempts,
                "max_attempts": j.max_attempts,
                "created_at": iso(j.created_at),
                "enqueued_at": iso(j.enqueued_at),
                "started_at": iso(j.started_at),
                "finished_at": iso(j.finished_at),
                "not_before": iso(j.not_before),
                "lease_owner": j.lease_owner,
                "lease_expires_at": iso(j.lease_expires_at),
                "step": j.step,
                "timings": j.timings,
                "model_versions": j.model_versions,
                "error": j.error,
            }
            for j, study_uid_ in rows
        ]


def _jobs(args, settings) -> int:
    with database(settings) as db:
        rows = job_rows(db, state=args.state, study_uid=args.study, limit=args.limit)
    if print_json_or_empty(rows, as_json=args.json, empty="no jobs"):
        return 0
    print(f"{'id':>6} {'state':<11} {'pipeline':<13} {'tries':>5} {'created':<20} {'inputs':<40} study")
    for r in rows:
        roles = ",".join(i["role"] or "?" for i in r["input_series"])
        created = (r["created_at"] or "")[:19].replace("T", " ")
        print(
            f"{r['id']:>6} {r['state']:<11} {r['pipeline']:<13} {r['attempts']:>2}/{r['max_attempts']:<2} "
            f"{created:<20} {roles[:40]:<40} {r['study_uid']}"
        )
        if r["error"]:
            print(f"{'':>6} error: {r['error'].splitlines()[0][:160]}")
    return 0


def _jobs_retry(args, settings) -> int:
    import getpass

    from node.jobs import retry_job

    with database(settings) as db:
        retry_job(db, args.job_id, actor=f"cli:{getpass.getuser()}")  # JobError → message, exit 1
    print(f"job {args.job_id} queued again")
    return 0


def _purge(args, settings) -> int:
    from node.retention import purge

    with database(settings) as db:
        report = purge(db, settings, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would purge" if report.dry_run else "purged"
    if not report.studies:
        print(f"nothing to purge (retention {settings.retention_days:g} days after delivery)")
        return 0
    for st in report.studies:
        print(f"{verb} study {st.study_uid}: {st.instances} instances, {st.bytes} bytes (delivered {st.delivered_at:%Y-%m-%d %H:%M})")
    print(f"{verb} {report.instances} instances ({report.bytes} bytes) of {len(report.studies)} stud(ies)")
    return 0


def _routing_check(args, settings) -> int:
    import tomllib
    from pathlib import Path

    from node.errors import RoutingError
    from node.routing import SeriesFacts, describe, load_rules

    path = Path(args.file) if args.file else settings.routing_rules
    rules = load_rules(path)  # RoutingError → "msknode: routing rules FILE: …", exit 1
    print(f"{path}: {len(rules.rules)} rules, valid")
    for line in describe(rules):
        print(line)
    if not args.table:
        return 0
    try:
        table = tomllib.loads(Path(args.table).read_text(encoding="utf-8"))["series"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise RoutingError(f"series table {args.table}: cannot read: {e}") from None
    wrong = 0
    for e in table:
        f = SeriesFacts(
            series_uid="1.2.3",
            modality=e.get("modality", "MR"),
            body_part=e.get("body_part"),
            series_description=e.get("description"),
            protocol_name=e.get("protocol"),
            study_description=e.get("study_description"),
            laterality=e.get("laterality"),
            calling_ae=e.get("calling_ae"),
            manufacturer=e.get("vendor"),
        )
        route = rules.route(f, uid_root=settings.uid_root)
        got = f"{route.pipeline}/{route.role}" if route.routed else "unrouted"
        if got != e.get("expect"):
            wrong += 1
            print(f"MISMATCH {e.get('vendor', '')} {e.get('description')!r} body part {e.get('body_part')!r}: "
                  f"{got} ({route.rule}), expected {e.get('expect')}")
    print(f"{len(table) - wrong} of {len(table)} table entries routed as expected")
    return 1 if wrong else 0

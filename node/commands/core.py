"""``msknode serve | listen | worker | web | db upgrade | series``."""

from __future__ import annotations

from node.commands import database, print_json_or_empty


def register(sub) -> None:
    p = sub.add_parser("serve", help="listener + worker + web on one machine (embedded default)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("listen", help="the DICOM listener (C-ECHO, C-STORE SCP)")
    p.set_defaults(func=_listen)

    p = sub.add_parser("worker", help="a Celery worker (pipeline jobs, dispatch) with the sweeper")
    p.add_argument("--queues", help="comma list of queues (default: MSKNODE_WORKER_QUEUES)")
    p.set_defaults(func=_worker)

    p = sub.add_parser("web", help="the web worklist and JSON API")
    p.set_defaults(func=_web)

    p = sub.add_parser("db", help="database maintenance")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dsub.required = True
    u = dsub.add_parser("upgrade", help="apply Alembic migrations (also done at every start)")
    u.set_defaults(func=_db_upgrade)

    p = sub.add_parser("series", help="received series")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per series")
    p.set_defaults(func=_series)


def _serve(args, settings) -> int:
    from node.ops.service import serve

    return serve(settings)


def _listen(args, settings) -> int:
    from node.receive.listener import run_listener

    return run_listener(settings)


def _worker(args, settings) -> int:
    from node.jobs.worker import run_worker

    queues = [q.strip() for q in args.queues.split(",")] if args.queues else None
    return run_worker(settings, queues=queues)


def _web(args, settings) -> int:
    from node.web.app import run_web

    return run_web(settings)


def _db_upgrade(args, settings) -> int:
    from node.db.database import upgrade

    upgrade(settings.database_url)
    print("database is at the latest schema")
    return 0


def series_rows(db) -> list[dict]:
    from sqlalchemy import select

    from node.db.schema import Series, Study

    with db.session() as s:
        rows = s.execute(select(Series, Study.study_uid).join(Study).order_by(Series.id)).all()
        return [
            {
                "study_uid": study_uid,
                "series_uid": se.series_uid,
                "modality": se.modality,
                "body_part": se.body_part,
                "series_description": se.series_description,
                "instances": se.instances,
                "state": se.state,
                "pipeline": se.pipeline,
                "role": se.role,
                "routing_rule": routing_rule(se),
                "routing_summary": routing_summary(se.routing_explanation),
            }
            for se, study_uid in rows
        ]


def routing_rule(se) -> str | None:
    """The name of the routing rule in force (the column), else the one recorded with the explanation."""
    if se.routing_rule:
        return se.routing_rule
    expl: dict = se.routing_explanation if isinstance(se.routing_explanation, dict) else {}
    decision = expl.get("decision")
    rule = decision.get("rule") if isinstance(decision, dict) else None
    return str(rule) if rule else None


def routing_summary(expl) -> str | None:
    """The one-line summary of a recorded routing explanation (what the log says, `Explanation.summary`);
    None while nothing was recorded (a series still receiving)."""
    if isinstance(expl, str):
        import json

        try:
            expl = json.loads(expl)
        except ValueError:
            return None
    if not isinstance(expl, dict) or not expl:
        return None
    recorded: dict = expl

    def part(name: str) -> dict:
        value = recorded.get(name)
        return value if isinstance(value, dict) else {}

    def fact(name: str) -> str:
        f = part(name)
        return f"{name} {f.get('value') or '?'} ({f.get('source') or 'not recorded'})"

    d = part("decision")
    outcome = f"{d.get('pipeline')}/{d.get('role')} (rule {d.get('rule')!r})" if d.get("routed") else d.get("rule")
    flags = ",".join(str(f) for f in recorded.get("flags") or []) or "-"
    return f"{fact('plane')}, {fact('contrast')}, {fact('anatomy')}, flags {flags} -> {outcome}"


def _series(args, settings) -> int:
    with database(settings) as db:
        rows = series_rows(db)
    if print_json_or_empty(rows, as_json=args.json, empty="no series received"):
        return 0
    print(f"{'series':<66} {'mod':<4} {'body part':<12} {'n':>5} {'state':<10} {'pipeline':<12} description")
    for r in rows:
        print(
            f"{r['series_uid']:<66} {r['modality'] or '':<4} {(r['body_part'] or '')[:12]:<12} "
            f"{r['instances']:>5} {r['state']:<10} {(r['pipeline'] or '-'):<12} {r['series_description'] or ''}"
        )
    return 0

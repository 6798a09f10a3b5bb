"""``msknode jobs [--json] | jobs retry ID``, ``msknode purge``, ``msknode routing check | explain``."""

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
    c.add_argument(
        "--table", metavar="FILE", help="also check a table of series and expected routes (vendor_series.toml format)"
    )
    c.set_defaults(func=_routing_check)
    e = rsub.add_parser(
        "explain",
        help="why a series is routed as it is: every signal, its value, where it came from, and the decision",
    )
    e.add_argument(
        "target",
        metavar="PATH_OR_SERIES_UID",
        help="a DICOM file, a folder holding one series (headers only are read), or a Series Instance UID in the node's index",
    )
    e.add_argument(
        "--json",
        action="store_true",
        help="the explanation as one JSON object (the routing_explanation of the series row)",
    )
    e.add_argument("--rules", metavar="FILE", help="the rules file to explain with (default MSKNODE_ROUTING_RULES)")
    e.set_defaults(func=_routing_explain)


def register_job_actions(actions) -> None:
    """Subcommands of ``msknode jobs``; ``retry`` is `node.jobs.lease.retry_job` (job orchestration)."""
    r = actions.add_parser("retry", help="queue a failed or dead job again")
    r.add_argument("job_id", type=int, metavar="ID")
    r.set_defaults(func=_jobs_retry)


def job_rows(db, *, state: str | None = None, study_uid: str | None = None, limit: int | None = None) -> list[dict]:
    """Jobs as plain dicts (the ``msknode jobs --json`` objects, `node.jobs.listing.JobOut`), newest first."""
    from node.jobs.listing import list_jobs

    with db.session() as s:
        return list_jobs(s, tz=None, state=state, study_uid=study_uid, limit=limit)


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

    from node.jobs.lease import retry_job

    with database(settings) as db:
        retry_job(db, args.job_id, actor=f"cli:{getpass.getuser()}")  # JobError → message, exit 1
    print(f"job {args.job_id} queued again")
    return 0


def _purge(args, settings) -> int:
    from node.ops.retention import purge

    with database(settings) as db:
        report = purge(db, settings, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would purge" if report.dry_run else "purged"
    if report.quarantined or report.associations:
        print(f"{verb} {report.quarantined} quarantined object(s) and {report.associations} association row(s)")
    if not report.studies:
        print(f"nothing to purge (retention {settings.retention_days:g} days after delivery)")
        return 0
    for st in report.studies:
        print(
            f"{verb} study {st.study_uid}: {st.instances} instances, {st.bytes} bytes (delivered {st.delivered_at:%Y-%m-%d %H:%M})"
        )
    print(f"{verb} {report.instances} instances ({report.bytes} bytes) of {len(report.studies)} stud(ies)")
    return 0


def _routing_check(args, settings) -> int:
    import tomllib
    from pathlib import Path

    from node.errors import RoutingError
    from node.intake.routing import describe, facts_from_table_entry, load_rules

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
    for entry in table:
        f = facts_from_table_entry(entry)  # RoutingError names a row with an unknown key
        route = rules.route(f, uid_root=settings.uid_root)
        got = f"{route.pipeline}/{route.role}" if route.routed else "unrouted"
        if got != entry.get("expect"):
            wrong += 1
            print(
                f"MISMATCH {entry.get('vendor', '')} {entry.get('description')!r} body part {entry.get('body_part')!r}: "
                f"{got} ({route.rule}), expected {entry.get('expect')}"
            )
    print(f"{len(table) - wrong} of {len(table)} table entries routed as expected")
    return 1 if wrong else 0


def _routing_explain(args, settings) -> int:
    from pathlib import Path

    from node.errors import RoutingError
    from node.intake.routing import load_rules
    from node.receive.storage import is_valid_uid

    rules = load_rules(Path(args.rules) if args.rules else settings.routing_rules)
    target = str(args.target)
    if len(target) > 4096:
        raise RoutingError("routing explain: the argument is too long for a path or a Series Instance UID")
    path = Path(target)
    if path.exists():
        explanation, where = _explain_path(path, rules, settings)
    elif is_valid_uid(target):
        explanation, where = _explain_indexed(target, rules, settings)
    else:
        raise RoutingError(
            f"routing explain: {target!r} is neither an existing file or folder nor a Series Instance UID"
        )
    if args.json:
        print(json.dumps({"series_uid": where["series_uid"], **explanation.to_json()}, indent=2))
        return 0
    print(format_explanation(explanation, where))
    return 0


def _explain_path(path, rules, settings):
    """The explanation of the series in a DICOM file or a folder of one series (headers only)."""
    from collections import Counter

    from node.errors import IngestError, RoutingError
    from node.intake.recognition import Acquisition
    from node.intake.routing import SeriesFacts, explain
    from node.receive.header import read_series_headers

    try:
        headers, skipped = read_series_headers(path)
    except IngestError as e:
        raise RoutingError(f"routing explain: {e}") from None
    if not headers:
        raise RoutingError(
            f"routing explain: {path} holds no DICOM instance ({skipped} file(s) could not be read as one)"
        )
    series = Counter(h.series_uid for h in headers)
    if len(series) > 1:
        raise RoutingError(
            f"routing explain: {path} holds {len(series)} series ({len(headers)} instances); give a file or the folder of one series"
        )
    headers.sort(key=lambda h: (h.instance_number is None, h.instance_number or 0, h.sop_instance_uid))
    first = headers[0]
    orientations = Counter(h.image_orientation for h in headers)
    facts = SeriesFacts(
        series_uid=first.series_uid,
        modality=first.modality,
        body_part=first.body_part,
        series_description=first.series_description,
        protocol_name=first.protocol_name,
        laterality=first.laterality,
        manufacturer=first.manufacturer,
        own_object=first.is_own_object(settings.uid_root),
        study_description=first.demographics.get("study_description"),
        orientations=tuple(orientations.most_common()),
        acquisition=Acquisition.from_json(first.acquisition),
    )
    explanation = explain(facts, rules, uid_root=settings.uid_root)
    where = {
        "series_uid": first.series_uid,
        "from": f"{path} ({len(headers)} instance(s) read"
        + (f", {skipped} file(s) skipped" if skipped else "")
        + "; headers only: no other series, no pixels)",
    }
    return explanation, where


def _explain_indexed(series_uid, rules, settings):
    """The explanation of an indexed series with its study, as the node routes it now (nothing is written)."""
    from pathlib import Path

    from sqlalchemy import select

    from node.db.schema import Series
    from node.errors import RoutingError
    from node.intake.completeness import explain_series

    if settings.is_sqlite:
        from sqlalchemy.engine import make_url

        file = make_url(str(settings.database_url)).database
        if file and file != ":memory:" and not Path(file).exists():
            raise RoutingError(
                f"routing explain: no series {series_uid}: there is no index at {file} (and no such file or folder)"
            )
    with database(settings) as db, db.session() as s:
        se = s.scalar(select(Series).where(Series.series_uid == series_uid))
        if se is None:
            raise RoutingError(
                f"routing explain: no series {series_uid} in the index of {settings.data_dir} "
                "(and no such file or folder)"
            )
        explanation = explain_series(s, settings, rules, se)
        recorded = (
            f"{se.pipeline}/{se.role} (rule {se.routing_rule!r})"
            if se.pipeline
            else (se.routing_rule or "not routed yet")
        )
        where = {
            "series_uid": series_uid,
            "from": f"the index ({se.instances} instance(s), state {se.state}; recorded decision: {recorded})",
        }
        s.rollback()  # explaining changes nothing
    return explanation, where


def format_explanation(explanation, where: dict) -> str:
    """The text of ``msknode routing explain``: the decision, plane, contrast, anatomy, flags, then every signal."""
    r = explanation.route
    decision = f"{r.pipeline}/{r.role} (rule {r.rule!r})" if r.routed else f"not routed: {r.rule}"
    lines = [f"series   {where['series_uid']}", f"from     {where['from']}", f"decision {decision}"]
    for name, d in (("plane", explanation.plane), ("contrast", explanation.contrast), ("anatomy", explanation.anatomy)):
        lines.append(f"{name:<8} {d.value or '-'} [{d.source}] {d.detail}")
    lines.append(f"flags    {', '.join(explanation.flags) or '-'}")
    lines.append("signals  (* = used in the decision)")
    width = max((len(sig.name) for sig in explanation.signals), default=4)
    for sig in explanation.signals:
        lines.append(f"  {'*' if sig.used else ' '} {sig.name:<{width}}  {sig.value}  <- {sig.source}")
    return "\n".join(lines)

"""``msknode monitor [--json]``: model monitoring and reading targets for cron and alerting.

Prints the report of `worklists.monitoring` (the admin dashboard's figures): per model
version the current window's positive and QC refusal rates against their control bands,
agreement with radiologists and estimated PPV/NPV with 95 % intervals, silent or stalled
pipelines, input drift, reading turnaround and overdue studies. Exit status: 0 no alert,
3 at least one alert (``status`` is "alert" in the JSON), 1 the report could not be made.
"""

from __future__ import annotations

import json

from node.commands import database

EXIT_ALERT = 3


def register(sub) -> None:
    p = sub.add_parser(
        "monitor",
        help="model monitoring and reading targets: alerts (exit 3), figures per model version",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--json", action="store_true", help="the whole report as one JSON object")
    p.set_defaults(func=_monitor)


def _pct(w: dict) -> str:
    if w.get("p") is None:
        return "n/a"
    out = f"{100 * w['p']:.1f} %"
    if w.get("lo") is not None and "k" in w:
        out += f" [{100 * w['lo']:.1f}, {100 * w['hi']:.1f}] ({w['k']}/{w['n']})"
    return out


def _monitor(args, settings) -> int:
    from node.db.database import utcnow
    from worklists.monitoring import node_report
    from worklists.triage import load_policy

    policy = load_policy(settings.triage_policy)
    with database(settings) as db:
        rep = node_report(settings, db, policy, utcnow())
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print(f"status: {rep['status']} ({len(rep['alerts'])} alerts)")
        for a in rep["alerts"]:
            print(f"  ALERT {a['kind']}: {a['message']}")
        for m in rep["models"]:
            c = m["current"]
            print(
                f"{m['model']} {m['version']}: {c['studies']} studies in the current window, "
                f"positive {_pct(c['positive'])}, QC refusals {_pct(c['qc_refusal'])}; "
                f"agreement {_pct(m['feedback']['agreement'])}, PPV {_pct(m['feedback']['ppv'])}"
            )
        for prio, n in rep["overdue"]["counts"].items():
            if n:
                print(f"overdue {prio}: {n}")
    return EXIT_ALERT if rep["alerts"] else 0

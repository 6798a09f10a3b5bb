"""``msknode outbox [--json] [--state S]``, ``msknode outbox retry ID``, ``msknode outbox send``."""

from __future__ import annotations

import json

from node.commands import database, print_json_or_empty


def register(sub) -> None:
    p = sub.add_parser("outbox", help="result objects waiting for, sent to or refused by the destinations")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per outbox item")
    p.add_argument("--state", choices=("pending", "sending", "sent", "dead"), help="only items in this state")
    p.set_defaults(func=_list)
    osub = p.add_subparsers(dest="outbox_command", metavar="ACTION")
    r = osub.add_parser("retry", help="re-queue a dead-lettered item (sent again at the next dispatch)")
    r.add_argument("id", type=int, help="outbox item id (see msknode outbox)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_retry)
    s = osub.add_parser("send", help="send every due item now, once")
    s.add_argument("--limit", type=int, default=200)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_send)


def _list(args, settings) -> int:
    from node.dispatch.outbox import list_items

    with database(settings) as db, db.session() as s:
        rows = list_items(s, state=args.state)
    if print_json_or_empty(rows, as_json=args.json, empty="outbox is empty"):
        return 0
    print(f"{'ID':>5}  {'STATE':8} {'KIND':8} {'ATT':>3}  {'DESTINATION':30} SOP INSTANCE UID / LAST ERROR")
    for r in rows:
        print(
            f"{r['id']:>5}  {r['state']:8} {r['kind']:8} {r['attempts']:>3}  {r['destination'][:30]:30} {r['sop_instance_uid']}"
        )
        if r["last_error"] and r["state"] != "sent":
            print(f"{'':>56}{r['last_error']}")
    return 0


def _retry(args, settings) -> int:
    from node.dispatch.outbox import retry_item

    with database(settings) as db:
        out = retry_item(db, settings, args.id, actor="cli")
    if args.json:
        print(json.dumps(out))
    else:
        print(f"outbox item {out['id']}: {out['previous_state']} -> {out['state']} (sent at the next dispatch)")
    return 0


def _send(args, settings) -> int:
    from node.dispatch.outbox import process_outbox

    with database(settings) as db:
        report = process_outbox(db, settings, limit=args.limit)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(f"claimed {report.claimed}: sent {report.sent}, retrying {report.retrying}, dead {report.dead}")
        for e in report.errors:
            print(f"  {e}")
    return 0 if report.dead == 0 else 1

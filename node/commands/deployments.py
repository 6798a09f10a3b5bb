"""``msknode deployments``: which version of each model a pipeline runs here, shadow or active.

``deployments [--json]`` lists them (the rows of every pipeline's models are created at first use,
in shadow unless the card records real-data validation or MSKNODE_ACTIVATE_MODELS names the model);
``deployments register MODEL --weights DIR --version V`` adds site-trained weights as a version (in
shadow, not selected); ``deployments activate MODEL --version V --pipeline P`` selects the version
and makes it live; ``deployments shadow ...`` selects it for a silent trial. Every change is audited
under ``--by`` (default: ``cli:<login name>``).
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

from node.commands import database, print_json_or_empty


def register(sub) -> None:
    p = sub.add_parser("deployments", help="model versions per pipeline at this site: shadow (silent trial) or active")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per registered version")
    p.set_defaults(func=_list)
    dsub = p.add_subparsers(dest="deployments_command", metavar="ACTION")
    r = dsub.add_parser("register", help="register trained weights (msknode train --out DIR) as a site version")
    r.add_argument("model", help="model name, e.g. knee.acl")
    r.add_argument("--weights", required=True, type=Path, help="folder (or model.pt) with model.pt.sha256, card.json")
    r.add_argument("--version", required=True, help="the version name results will carry, e.g. 1.1.0-site")
    r.add_argument("--pipeline", action="append", default=[], help="only this pipeline (repeatable; default: all)")
    r.add_argument("--by", default=None, help="who registers it (audit); default cli:<login name>")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_register)
    for state, help_text in (
        ("activate", "select this version for the pipeline and make it live (priority, results to the PACS)"),
        ("shadow", "select this version for the pipeline in shadow (stored and shown, nothing sent)"),
    ):
        a = dsub.add_parser(state, help=help_text)
        a.add_argument("model")
        a.add_argument("--version", required=True)
        a.add_argument("--pipeline", required=True)
        a.add_argument("--by", default=None, help="who decides (audit); default cli:<login name>")
        a.add_argument("--reason", default=None, help="why (audit), e.g. the evaluation it rests on")
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=_change, state="active" if state == "activate" else "shadow")


def _actor(args) -> str:
    if args.by:
        return str(args.by)[:64]
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except Exception:  # no login name (a container without a passwd entry)
        return "cli"


def _list(args, settings) -> int:
    from models.registry import Registry
    from node.jobs import deployments

    with database(settings) as db:
        deployments.ensure_all(db, settings, Registry(settings.weights_dir))
        with db.session() as s:
            rows = deployments.listing(s)
    if print_json_or_empty(rows, as_json=args.json, empty="no model deployments"):
        return 0
    print(f"{'PIPELINE':13} {'MODEL':22} {'VERSION':14} {'STATE':7} {'SEL':3}  {'CHANGED BY':16} CHANGED AT")
    for r in rows:
        sel = "*" if r["selected"] else ""
        print(
            f"{r['pipeline']:13} {r['model']:22} {r['version']:14} {r['state']:7} {sel:3}  "
            f"{r['changed_by'][:16]:16} {r['changed_at']}"
        )
    return 0


def _register(args, settings) -> int:
    from models.registry import Registry
    from node.jobs import deployments

    with database(settings) as db:
        deployments.ensure_all(db, settings, Registry(settings.weights_dir))  # the shipped versions first
        with db.session() as s:
            rows = deployments.register(
                s,
                settings,
                model_name=args.model,
                version=args.version,
                weights=args.weights,
                actor=_actor(args),
                pipelines=args.pipeline or None,
            )
            out = [
                {
                    "pipeline": r.pipeline,
                    "model": r.model_name,
                    "version": r.version,
                    "state": r.state,
                    "weights_sha256": r.weights_sha256,
                    "weights_dir": r.weights_dir,
                }
                for r in rows
            ]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            print(
                f"{r['model']} {r['version']} registered for {r['pipeline']} (shadow, not selected): {r['weights_dir']}"
            )
    return 0


def _change(args, settings) -> int:
    from models.registry import Registry
    from node.jobs import deployments

    with database(settings) as db:
        deployments.ensure_all(db, settings, Registry(settings.weights_dir))
        with db.session() as s:
            row = deployments.change(
                s,
                pipeline=args.pipeline,
                model_name=args.model,
                version=args.version,
                state=args.state,
                actor=_actor(args),
                reason=args.reason,
            )
            out = {
                "pipeline": row.pipeline,
                "model": row.model_name,
                "version": row.version,
                "state": row.state,
                "changed_by": row.changed_by,
            }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{out['model']} {out['version']} is now {out['state']} in pipeline {out['pipeline']} (by {out['changed_by']})"
        )
    return 0

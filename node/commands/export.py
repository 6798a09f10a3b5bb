"""``msknode export feedback --model M --out DIR [--deidentify] [--holdout F]``: the studies radiologists
answered, as a ``dicomcsv:`` labelled set for ``msknode train`` / ``msknode evaluate`` (node.ops.feedback_export)."""

from __future__ import annotations

import json
from pathlib import Path

from node.commands import database


def register(sub) -> None:
    p = sub.add_parser("export", help="export data the node collected")
    esub = p.add_subparsers(dest="export_command", metavar="WHAT")
    esub.required = True
    f = esub.add_parser(
        "feedback", help="studies with a radiologist's answer to a model, as dicomcsv: (series + labels.csv)"
    )
    f.add_argument("--model", required=True, help="model name, e.g. knee.acl")
    f.add_argument("--out", required=True, type=Path, help="a new (or empty) folder")
    f.add_argument(
        "--deidentify",
        action="store_true",
        help="apply the DICOM PS3.15 Basic Application Level Confidentiality Profile (dicom-anonymizer)",
    )
    f.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="hold this fraction of the studies out (OUT/train and OUT/holdout) for msknode evaluate; default 0",
    )
    f.add_argument("--json", action="store_true", help="print the manifest (export.json) as JSON")
    f.set_defaults(func=_feedback)


def _feedback(args, settings) -> int:
    from node.ops.feedback_export import export_feedback

    with database(settings) as db:
        manifest = export_feedback(
            db, settings, model=args.model, out=args.out, deidentify=args.deidentify, holdout=args.holdout
        )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"{manifest['studies']} studies of {manifest['model']} exported to {args.out}")
        for side, spec in manifest["data_specs"].items():
            n = manifest["sides"][side]["studies"]
            print(f"  {side}: {n} studies, --data {spec}")
        if manifest["skipped"]:
            print(f"  skipped: {json.dumps(manifest['skipped'])}")
        if manifest["deidentified"]:
            print(f"  de-identified: {manifest['deidentification_profile']}")
    return 0

"""Write phantom DICOM from the command line.

    python -m models.phantoms study knee OUT_DIR --seed 3 --set acl=complete
    python -m models.phantoms series lumbar_spine OUT_DIR --seed 7 --set stenosis=severe --set matrix=384
    python -m models.phantoms labels shoulder --seed 5

``--set KEY=VALUE`` passes a label or nuisance override (VALUE parsed as JSON when possible:
``--set 'stenosis={"L4-L5": "severe"}'``, ``--set snr=null``).
"""

from __future__ import annotations

import argparse
import json
import sys

from models.phantoms import ANATOMIES, PhantomError, generate, write_dicom_series, write_study


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise PhantomError(f"--set needs KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.phantoms", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("study", "series"):
        p = sub.add_parser(name)
        p.add_argument("anatomy", choices=ANATOMIES)
        p.add_argument("out_dir")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("labels")
    p.add_argument("anatomy", choices=ANATOMIES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        over = _overrides(args.set)
        if args.cmd == "study":
            out = write_study(args.anatomy, args.out_dir, args.seed, **over)
            print(json.dumps({role: len(paths) for role, paths in out.items()}))
        elif args.cmd == "series":
            paths = write_dicom_series(generate(args.anatomy, args.seed, **over), args.out_dir)
            print(json.dumps({"files": len(paths), "out_dir": args.out_dir}))
        else:
            print(json.dumps(generate(args.anatomy, args.seed, **over).labels, indent=2))
    except PhantomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``msknode bench``: measurements that are not tests (ingest, end to end, models).

Each benchmark is one small ``_add_<name>(bench_sub)`` function that adds its subcommand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (not tests)")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_sub.required = True
    _add_ingest(bench_sub)
    _add_e2e(bench_sub)
    _add_load(bench_sub)
    _add_models(bench_sub)


def _add_ingest(bench_sub) -> None:
    p = bench_sub.add_parser(
        "ingest",
        help="C-STORE throughput: msknode (fast transport and stock pynetdicom) vs Orthanc vs dcmtk storescp, "
        "one and four associations",
    )
    p.add_argument(
        "--instances", type=int, default=400, help="instances to generate (series of 40 slices; default 400)"
    )
    p.add_argument("--input", type=Path, help="send the DICOM files under this directory instead of a generated set")
    p.add_argument(
        "--listener-processes",
        type=int,
        help="msknode listener processes for the run (default: MSKNODE_LISTENER_PROCESSES, i.e. the node as configured)",
    )
    p.add_argument("--workdir", type=Path, help="where the receivers store (default: the system temp dir)")
    p.add_argument(
        "--only", help="comma list of receivers to run (msknode,msknode-stock,orthanc,storescp; default all)"
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds; ratios use the medians (for a busy machine)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="instances per association each receiver gets, untimed, before the timed send "
        "(default 4; 0: none, the receivers' first calls timed too)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_ingest)


def _bench_ingest(args, settings) -> int:
    from node.demo.bench_ingest import (
        MSKNODE_RECEIVERS,
        RECEIVERS,
        WARMUP_PER_ASSOCIATION,
        format_report,
        run_bench,
    )

    if args.instances < 4:
        print("msknode: --instances must be at least 4", file=sys.stderr)
        return 2
    warmup = WARMUP_PER_ASSOCIATION if args.warmup is None else args.warmup
    if not 0 <= warmup <= 1000:
        print("msknode: --warmup must be between 0 and 1000", file=sys.stderr)
        return 2
    receivers = tuple(r.strip() for r in args.only.split(",")) if args.only else RECEIVERS
    unknown = set(receivers) - set(RECEIVERS)
    if unknown:
        print(f"msknode: unknown receiver(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    progress = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    result = run_bench(
        instances=args.instances,
        warmup=warmup,
        input_dir=args.input,
        workdir=args.workdir,
        listener_processes=max(1, args.listener_processes or settings.listener_processes),
        receivers=receivers,
        repeat=max(1, args.repeat),
        progress=progress,
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print()
        print(format_report(result))
    return 0 if result.all_arrived or not set(MSKNODE_RECEIVERS) & set(receivers) else 1


def _add_e2e(bench_sub) -> None:
    p = bench_sub.add_parser(
        "e2e",
        help="PACS-to-results latency: knee studies sent into Orthanc, auto-routed to msknode serve, results back",
    )
    p.add_argument("--studies", type=int, default=5, help="studies to time, sent one after another (default 5)")
    p.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    p.add_argument("--matrix", type=int, default=384, help="image matrix (default 384)")
    p.add_argument("--warmup", type=int, default=1, help="untimed studies first, to load the models (default 1)")
    p.add_argument("--workdir", type=Path, help="keep Orthanc, the node data and the phantom cache here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one study's results")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_e2e)


def _bench_e2e(args, settings) -> int:
    from node.demo.bench_e2e import format_report, run_bench

    if args.studies < 1 or args.slices < 8 or args.matrix < 64 or args.warmup < 0:
        print("msknode: --studies >= 1, --slices >= 8, --matrix >= 64 and --warmup >= 0 are required", file=sys.stderr)
        return 2
    progress = (
        (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    )
    result = run_bench(
        settings,
        studies=args.studies,
        slices=args.slices,
        matrix=args.matrix,
        warmup=args.warmup,
        workdir=args.workdir,
        timeout=args.timeout,
        progress=progress,
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print()
        print(format_report(result))
    return 0 if result.all_arrived else 1


def _add_load(bench_sub) -> None:
    p = bench_sub.add_parser(
        "load",
        help="a busy day: knee, shoulder and spine studies arriving from Orthanc at a steady rate; throughput, "
        "latency, queue depth, CPU and memory",
    )
    p.add_argument("--studies", type=int, default=20, help="studies to send (default 20)")
    p.add_argument("--rate", type=float, default=4.0, help="studies per minute arriving in Orthanc (default 4)")
    p.add_argument("--slices", type=int, default=40, help="slices per series (default 40, as bench e2e)")
    p.add_argument("--matrix", type=int, default=384, help="image matrix (default 384, as bench e2e)")
    p.add_argument(
        "--workers",
        type=int,
        choices=(1, 2, 3, 4),
        default=1,
        help="worker processes (more than 1: extra "
        "`msknode worker` processes on the cpu queue, as worker machines would be; default 1)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed knee studies first, to load the models (default 1)")
    p.add_argument(
        "--database-url",
        help="the node's database (e.g. postgresql+psycopg://...; an empty database; default: SQLite in the run's "
        "directory). MSKNODE_DATABASE_URL is not read: the benchmark never touches a configured node",
    )
    p.add_argument("--broker-url", help="the broker (e.g. redis://127.0.0.1:6379/0; default: the filesystem broker)")
    p.add_argument("--workdir", type=Path, help="keep Orthanc, the node data and the phantom cache here")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for results after the last study was sent"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_load)


def _bench_load(args, settings) -> int:
    from node.demo.bench_load import format_report, run_bench
    from node.errors import EndToEndError

    if args.studies < 1 or args.rate <= 0 or args.slices < 8 or args.matrix < 64:
        print("msknode: --studies >= 1, --rate > 0, --slices >= 8 and --matrix >= 64 are required", file=sys.stderr)
        return 2
    progress = (
        (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    )
    try:
        result = run_bench(
            settings,
            studies=args.studies,
            rate=args.rate,
            slices=args.slices,
            matrix=args.matrix,
            workers=args.workers,
            warmup=max(0, args.warmup),
            database_url=args.database_url,
            broker_url=args.broker_url,
            workdir=args.workdir,
            timeout=args.timeout,
            progress=progress,
        )
    except EndToEndError as exc:
        print(f"msknode: bench load: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print()
        print(format_report(result))
    return 0 if result.summary()["all_once"] else 1


def _add_models(bench_sub) -> None:
    p = bench_sub.add_parser(
        "models",
        help="CPU time and peak RSS per study of the shipped models (knee, shoulder, lumbar spine) on typical inputs",
    )
    p.add_argument(
        "--anatomy",
        action="append",
        choices=("knee", "shoulder", "lumbar_spine"),
        help="only this anatomy (repeatable; default all three)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="studies timed after the first one (default 3)")
    p.add_argument("--no-layouts", action="store_true", help="skip the forward-pass layout/mode comparison")
    p.add_argument("--workdir", type=Path, help="where the generated DICOM inputs go (default: the system temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_models)


def _bench_models(args, settings) -> int:
    from models.bench import BenchError, format_report, run_bench

    progress = (
        (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    )
    anatomies = tuple(dict.fromkeys(args.anatomy)) if args.anatomy else ("knee", "shoulder", "lumbar_spine")
    # no site deployment here: every shipped model runs as if active (at a site they start in shadow)
    progress("models: the shipped models run active in this benchmark (no site deployment state; docs/models.md)")
    try:
        result = run_bench(
            anatomies=anatomies,
            threads=args.threads,
            repeats=args.repeat,
            layouts=not args.no_layouts,
            workdir=args.workdir,
            log=progress,
        )
    except BenchError as exc:
        print(f"msknode: bench models: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0

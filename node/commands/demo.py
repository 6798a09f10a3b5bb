"""``msknode demo``: Orthanc as the PACS auto-routing to msknode, four phantom studies, results back in the PACS."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole node end to end with Orthanc as the PACS (what `make demo` runs)",
        description=(
            "Starts Orthanc (the PACS, auto-routing new MR instances to msknode) and `msknode serve` on the "
            "embedded default under the demo data dir, sends a knee with an ACL tear, a shoulder with a "
            "full-thickness cuff tear, a lumbar spine with severe stenosis and a normal knee into Orthanc, "
            "waits for every result in Orthanc, validates them with dciodvfy and prints a table, the worklist "
            "URL and the demo login. Then keeps running until Ctrl-C (or stops with --once / DEMO_ONCE=1). "
            "Exit status 1 when a result is missing or invalid. The data dir is reset at every run."
        ),
    )
    p.add_argument("--data-dir", help="demo data directory (env DEMO_DATA_DIR; default ./demo-data)")
    p.add_argument(
        "--once", action="store_true", help="stop the services and exit 0 once all results arrived (env DEMO_ONCE=1)"
    )
    p.add_argument(
        "--free-ports",
        action="store_true",
        help="use free ports instead of 4242/8042 (Orthanc) and 11112/8080 (msknode) (env DEMO_FREE_PORTS=1)",
    )
    p.add_argument("--timeout", type=float, help="seconds to wait for all results (env DEMO_TIMEOUT; default 900)")
    p.add_argument(
        "--case",
        action="append",
        dest="cases",
        metavar="NAME",
        help="only this demo study (repeatable): knee-acl, shoulder-cuff, spine-stenosis, knee-normal",
    )
    p.add_argument("--no-validate", action="store_true", help="skip dciodvfy on the results (faster)")
    p.set_defaults(func=_demo)


def _demo(args, settings) -> int:
    from node.demo.cases import cases_by_key
    from node.demo.run_demo import options_from_env, run_demo

    opts = options_from_env(args.once, args.free_ports, args.data_dir, args.timeout)
    opts.cases = cases_by_key(args.cases)
    opts.validate = not args.no_validate

    def say(msg: str) -> None:
        print(msg, flush=True)

    return run_demo(settings, opts, say=say)

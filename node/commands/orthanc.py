"""``msknode orthanc autoroute-script``: the Orthanc auto-routing rule with this node's AE title, host and port."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("orthanc", help="Orthanc as the PACS in front of msknode")
    osub = p.add_subparsers(dest="orthanc_command", metavar="ACTION")
    osub.required = True
    s = osub.add_parser(
        "autoroute-script",
        help="the Lua auto-routing rule for Orthanc, with this node's AE title, host, port and UID root",
        description=(
            "Prints (or writes) one Lua file for Orthanc's LuaScripts: msknode's AE title, port and UID root "
            "from the settings (MSKNODE_AE_TITLE, MSKNODE_PORT, MSKNODE_UID_ROOT), the host Orthanc reaches "
            "it at, an Initialize() that registers msknode as an Orthanc modality, and the shipped rule "
            "(docker/orthanc-autoroute.lua): every new MR instance is forwarded, never msknode's own objects."
        ),
    )
    s.add_argument(
        "--host", help="the address Orthanc reaches msknode at (default: MSKNODE_HOST, required when it is 0.0.0.0)"
    )
    s.add_argument(
        "--modality", default="msknode", help="msknode's name in Orthanc's DicomModalities (default msknode)"
    )
    s.add_argument("--route-modalities", default="MR", help="comma list of Modality values to forward (default MR)")
    s.add_argument("-o", "--output", metavar="FILE", help="write the script to FILE instead of printing it")
    s.set_defaults(func=_autoroute_script)


def _autoroute_script(args, settings) -> int:
    from node.demo.orthanc import autoroute_script

    text = autoroute_script(settings, host=args.host, modality=args.modality, route_modalities=args.route_modalities)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

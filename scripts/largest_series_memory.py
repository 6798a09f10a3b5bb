"""Peak memory of one job on the largest study the node accepts (docs/benchmarks.md, "Memory").

Writes a knee phantom study whose three series are ``--matrix`` x ``--matrix`` x ``--slices`` (default
512 x 512 x 96, MSKNODE_MAX_SERIES_VOXELS), then does what a worker does with it in this one process:
loads the series, runs the knee pipeline (both models and super-resolution) and writes every result
object, printing the peak RSS after each step. A phantom this large is not recognised as a knee by the
QC gate (which would refuse it and spare the memory), so the gate's verdict is forced to "accepted":
this is the worst case, every model and super-resolution running.

    .venv/bin/python scripts/largest_series_memory.py [--slices 96] [--matrix 512] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=96)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="keep the phantom here (default: a temporary directory)")
    ap.add_argument("--write-phantom", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_phantom:
        from models.phantoms import write_study

        write_study("knee", args.write_phantom, 3, n_slices=args.slices, matrix=args.matrix)
        return 0

    import torch

    from models import io, pipelines
    from models.qc import gate as qcgate
    from models.registry import Registry
    from models.types import QCResult
    from node.results import build_results, save
    from node.settings import load_settings
    from worklists import triage

    torch.set_num_threads(args.threads)
    check = qcgate.QCGate.check

    def accepted(self, volume, task):  # the worst case: every model and super-resolution run
        return QCResult(True, None, None, dict(check(self, volume, task).metrics or {}))

    qcgate.QCGate.check = accepted  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="msknode-largest-") as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.monotonic()
        # in a child process: the phantom generator's own peak must not count
        subprocess.run(
            [sys.executable, __file__, "--write-phantom", str(root / "study"), "--slices", str(args.slices)]
            + ["--matrix", str(args.matrix)],
            check=True,
        )
        roles = {d.name: sorted(d.glob("*.dcm")) for d in (root / "study").iterdir() if d.name != "localizer"}
        print(f"phantom: {args.matrix} x {args.matrix} x {args.slices} per series [{time.monotonic() - t0:.0f} s]")
        start = peak_mb()
        t0 = time.monotonic()
        volumes = {r: io.load_series(p) for r, p in roles.items()}
        print(f"load: peak {peak_mb():.0f} MB [{time.monotonic() - t0:.0f} s]", flush=True)
        output = pipelines.run_pipeline("knee", volumes, registry=Registry(None))
        print(f"pipeline: peak {peak_mb():.0f} MB [{time.monotonic() - t0:.0f} s]", flush=True)
        settings = load_settings(data_dir=root / "node")
        settings.ensure_dirs()
        summary = triage.compute(triage.findings_from_pipeline(output), triage.load_policy(settings.triage_policy))
        files = build_results(
            output=output,
            source_files={v.series_uid: roles[r] for r, v in volumes.items()},
            triage=summary,
            predecessors=[],
            settings=settings,
            job_fingerprint="largest-series-memory",
        )
        for f in files:
            save(f, settings)
        print(f"results ({len(files)} objects): peak {peak_mb():.0f} MB [{time.monotonic() - t0:.0f} s]")
        print(f"peak RSS {peak_mb():.0f} MB (before loading: {start:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

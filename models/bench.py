"""``msknode bench models``: per-study CPU time and peak memory of the shipped models.

Typical inputs are written as DICOM series first (knee: sagittal PD-FS and coronal PD-FS,
40 x 384 x 384 each; shoulder: coronal-oblique T2-FS 24 x 384 x 384; lumbar spine: sagittal
T2 15 x 512 x 512). Each anatomy then runs in its own fresh process, so its peak RSS is its
own: load the models once (as a worker does), then per study load the DICOM series, run the
QC gate, every classifier of the pipeline with saliency and MC-dropout uncertainty, and
super-resolution. The first study after loading is reported apart from the steady state
(median of the following repeats), which is what a running worker sees.

A second section times the classifier forward pass on the same inputs four ways (gradients
on / ``torch.inference_mode``, NCDHW / channels-last-3D) so the choice of layout and mode is
backed by figures measured in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ModelsError


@dataclass(frozen=True)
class StudyInput:
    role: str
    orientation: str | None
    sequence: str
    n_slices: int
    matrix: int


STUDIES: dict[str, tuple[StudyInput, ...]] = {
    "knee": (StudyInput("sag_fluid", None, "PD_FS", 40, 384), StudyInput("cor_fluid", "coronal", "PD_FS", 40, 384)),
    "shoulder": (StudyInput("cor_fluid", None, "T2_FS", 24, 384),),
    "lumbar_spine": (StudyInput("sag_t2", None, "T2", 15, 512),),
}
SEEDS = {"knee": 8_800_001, "shoulder": 8_800_002, "lumbar_spine": 8_800_003}
LABELS: dict[str, dict[str, Any]] = {
    "knee": {"acl": "complete"},
    "shoulder": {"cuff": "full_thickness"},
    "lumbar_spine": {},
}


class BenchError(ModelsError):
    """The benchmark could not run (bad arguments, a child process failed)."""


def write_inputs(root: Path, anatomies: tuple[str, ...]) -> dict[str, dict[str, Path]]:
    """Write each anatomy's typical series as DICOM under ``root/<anatomy>/<role>/``."""
    from models.phantoms import generate, write_dicom_series

    out: dict[str, dict[str, Path]] = {}
    for anatomy in anatomies:
        out[anatomy] = {}
        study_uid = None
        for number, s in enumerate(STUDIES[anatomy], start=1):
            kw: dict[str, Any] = {"matrix": s.matrix, "n_slices": s.n_slices, "sequence": s.sequence}
            if s.orientation:
                kw["orientation"] = s.orientation
            ph = generate(anatomy, SEEDS[anatomy], **kw, **LABELS[anatomy])
            d = root / anatomy / s.role
            paths = write_dicom_series(
                ph, d, series_description=f"{s.role} {s.sequence}", study_uid=study_uid, series_number=number
            )
            if study_uid is None:
                from pydicom import dcmread

                study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            out[anatomy][s.role] = d
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _forward_modes(model, volume, extras, repeats: int) -> dict[str, float]:
    """Median seconds of one classifier forward (features + heads) per mode."""
    import torch

    img, _ = model.preprocess(volume, extras)
    base = torch.from_numpy(img[None].copy())
    net = model.net
    out: dict[str, float] = {}
    conv = next(p for p in net.parameters() if p.dim() == 5)
    shipped_layout = (
        torch.channels_last_3d
        if conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
        else torch.contiguous_format
    )
    for layout in ("ncdhw", "channels_last"):
        fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
        net.to(memory_format=fmt)
        x = base.contiguous(memory_format=fmt)
        for mode in ("grad", "inference_mode"):
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                if mode == "grad":
                    logits, _ = net(x)
                    logits[0].sum().backward()
                    net.zero_grad(set_to_none=True)
                else:
                    with torch.inference_mode():
                        net(x)
                times.append(time.perf_counter() - t0)
            out[f"{layout}_{mode}_s"] = round(statistics.median(times[1:]), 4)
    net.to(memory_format=shipped_layout)
    return out


def run_anatomy(anatomy: str, dirs: dict[str, Path], *, threads: int, repeats: int, layouts: bool) -> dict[str, Any]:
    """Run in a fresh process: models loaded once, then ``1 + repeats`` studies; figures in seconds / MB."""
    import torch

    from models.io import load_folder
    from models.pipelines import PIPELINES, run_pipeline
    from models.registry import MODEL_SUPERRES, Registry

    torch.set_num_threads(threads)
    rss_start = _peak_rss_mb()
    spec = PIPELINES[anatomy]
    t0 = time.perf_counter()
    registry = Registry()
    for name in spec.models:
        registry.get(name)
    if spec.superres:
        registry.get(MODEL_SUPERRES)
    registry.gate()
    model_load_s = time.perf_counter() - t0
    studies: list[dict[str, Any]] = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        volumes = {}
        for role, d in dirs.items():
            (vol,) = load_folder(d).values()
            volumes[role] = vol
        t_load = time.perf_counter() - t0
        res = run_pipeline(anatomy, volumes, registry=registry, superres=True, saliency=True)
        total = time.perf_counter() - t0
        per_model = {}
        for o in res.outputs:
            per_model[o.model.name] = {
                "qc": "accepted" if o.qc.accepted else o.qc.reason,
                **{k: round(v, 3) for k, v in (o.timings or {}).items()},
            }
        for sr in res.superres:
            per_model[sr.model.name] = {
                "qc": "accepted" if sr.qc is None or sr.qc.accepted else sr.qc.reason,
                "consistency_passed": bool(sr.consistency_passed),
                **{k: round(v, 3) for k, v in (sr.timings or {}).items()},
                "total_s": round(res.timings.get(MODEL_SUPERRES, 0.0), 3),
            }
        studies.append(
            {
                "study_s": total,
                "load_s": t_load,
                "models": per_model,
                "findings": [f"{o.model.name}:{f.code}:{f.positive}" for o in res.outputs for f in o.findings],
            }
        )
    steady = studies[1:] or studies
    result: dict[str, Any] = {
        "anatomy": anatomy,
        "series": {role: list(v.shape) for role, v in volumes.items()},
        "models": list(spec.models) + ([MODEL_SUPERRES] if spec.superres else []),
        "threads": threads,
        "model_load_s": round(model_load_s, 3),
        "first_study_s": round(studies[0]["study_s"], 3),
        "study_s": round(statistics.median(s["study_s"] for s in steady), 3),
        "dicom_load_s": round(statistics.median(s["load_s"] for s in steady), 3),
        "per_model": steady[-1]["models"],
        "findings": steady[-1]["findings"],
        "baseline_rss_mb": round(rss_start, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if layouts:
        result["forward_modes"] = {
            name: _forward_modes(
                registry.get(name),
                volumes[next(r for r in registry.get(name).task.input.roles if r in volumes)],
                {r: volumes[r] for r in registry.get(name).task.input.extra_roles if r in volumes},
                repeats=max(2, repeats),
            )
            for name in spec.models
            if hasattr(registry.get(name), "net")  # 3-D classifiers (lumbar_spine.discs runs two 2-D networks)
        }
    return result


def run_bench(
    *,
    anatomies: tuple[str, ...] = ("knee", "shoulder", "lumbar_spine"),
    threads: int = 2,
    repeats: int = 3,
    layouts: bool = True,
    workdir: Path | None = None,
    log=lambda m: None,
) -> dict[str, Any]:
    """Write the inputs, run each anatomy in a fresh process, collect the figures."""
    from models.pipelines import PIPELINES

    unknown = [a for a in anatomies if a not in STUDIES]
    if unknown:
        raise BenchError(f"unknown anatomy {', '.join(unknown)}; expected {', '.join(STUDIES)}")
    if threads < 1 or repeats < 0:
        raise BenchError("--threads must be >= 1 and --repeat >= 0")
    with tempfile.TemporaryDirectory(prefix="msknode-bench-models-", dir=workdir) as tmp:
        log("writing typical series as DICOM ...")
        inputs = write_inputs(Path(tmp), anatomies)
        per_anatomy: dict[str, dict[str, Any]] = {}
        for anatomy in anatomies:
            if not PIPELINES[anatomy].models and not PIPELINES[anatomy].superres:
                per_anatomy[anatomy] = {"anatomy": anatomy, "skipped": "no shipped weights"}
                continue
            log(f"{anatomy}: models {', '.join(PIPELINES[anatomy].models) or '-'} ...")
            args = {
                "anatomy": anatomy,
                "dirs": {r: str(p) for r, p in inputs[anatomy].items()},
                "threads": threads,
                "repeats": repeats,
                "layouts": layouts,
            }
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            proc = subprocess.run(
                [sys.executable, "-m", "models.bench", json.dumps(args)], capture_output=True, text=True, env=env
            )
            if proc.returncode != 0:
                raise BenchError(f"{anatomy} run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            per_anatomy[anatomy] = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {"threads": threads, "repeats": repeats, "per_anatomy": per_anatomy}
    knee = per_anatomy.get("knee", {})
    out["knee_study_s"] = knee.get("study_s")
    out["knee_first_study_s"] = knee.get("first_study_s")
    out["knee_peak_rss_mb"] = knee.get("peak_rss_mb")
    out["knee_models"] = knee.get("models")
    out["targets"] = {"knee_study_s": 10.0, "knee_peak_rss_mb": 3072.0}
    out["within_targets"] = (
        knee.get("study_s") is not None and knee["study_s"] <= 10.0 and knee["peak_rss_mb"] <= 3072.0
    )
    return out


def format_report(res: dict[str, Any]) -> str:
    lines = [
        f"models benchmark: {res['threads']} torch thread(s), steady state = median of {res['repeats']} "
        f"studies after the first"
    ]
    for anatomy, r in res["per_anatomy"].items():
        if "skipped" in r:
            lines.append(f"  {anatomy}: skipped ({r['skipped']})")
            continue
        series = ", ".join(f"{role} {'x'.join(map(str, shape))}" for role, shape in r["series"].items())
        lines.append(f"  {anatomy} [{series}] models: {', '.join(r['models'])}")
        lines.append(
            f"    study {r['study_s']:.2f} s (first after loading {r['first_study_s']:.2f} s; DICOM load "
            f"{r['dicom_load_s']:.2f} s; model load once {r['model_load_s']:.2f} s), peak RSS "
            f"{r['peak_rss_mb']:.0f} MB (interpreter, torch and MONAI loaded: {r['baseline_rss_mb']:.0f} MB)"
        )
        for name, t in r["per_model"].items():
            parts = ", ".join(f"{k} {v}" for k, v in t.items())
            lines.append(f"    {name}: {parts}")
        for name, modes in (r.get("forward_modes") or {}).items():
            lines.append(f"    {name} forward: " + ", ".join(f"{k[:-2]} {v * 1000:.0f} ms" for k, v in modes.items()))
    verdict = "within" if res["within_targets"] else "OUTSIDE"
    lines.append(
        f"knee study {res['knee_study_s']} s, peak RSS {res['knee_peak_rss_mb']} MB: {verdict} the targets "
        f"(<= 10 s, <= 3072 MB)"
    )
    return "\n".join(lines)


def _child(arg: str) -> int:
    a = json.loads(arg)
    res = run_anatomy(
        a["anatomy"],
        {r: Path(p) for r, p in a["dirs"].items()},
        threads=int(a["threads"]),
        repeats=int(a["repeats"]),
        layouts=bool(a["layouts"]),
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))

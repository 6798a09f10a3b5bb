"""``msknode bench e2e``: PACS-to-results latency of whole knee studies, auto-routed by Orthanc.

N knee phantom studies (40 slices per series by default: sagittal PD-FS, sagittal PD, coronal
PD-FS and a 3-plane localizer) are sent one after another into Orthanc with ``storescu``; Orthanc
forwards each instance to msknode (``msknode serve``, embedded default) as it is stored. A study
is sent only when the previous one's results are all back in Orthanc and Orthanc's routing job
has ended (`OrthancPacs.wait_routing_idle`), so each figure is the latency of one study on an idle
node and an idle PACS. For each study:

    total        = last result object stored in Orthanc - last source instance stored in Orthanc
    first_result = the SR (the findings) stored in Orthanc - last source instance stored in Orthanc

(both from Orthanc's reception log, microsecond timestamps); ``findings_first`` says whether the SR and
SEG objects of the study were all stored in Orthanc before any derived object (overlay, super-resolved
instance). The total is broken down with the node's own timestamps and ``jobs.timings``:

    forward            last source instance in Orthanc -> last instance stored by msknode
    completeness_wait  last instance at msknode -> job created (series/study complete)
    queue_wait         job created -> job claimed by a worker
    load               series -> volumes (models.io), job context
    inference          all models (per model: inference_per_model)
    writing            triage + result objects (SR, SEG, super-resolved series, SC) written
    other_job          the rest of the job (commit, worklist)
    dispatch           job done -> last result object stored in Orthanc

One warm-up study (not counted) first loads the models in the worker.

The node is configured as a site would be for the studies its scanners send: a study protocol
per pipeline (``MSKNODE_STUDY_PROTOCOLS``, `BENCH_STUDY_PROTOCOLS`: the series of the phantom
studies, `models.phantoms.write_study`), so a study is settled the moment its last protocol
series is complete, while Orthanc still holds its association open. A caller's own
``MSKNODE_STUDY_PROTOCOLS`` replaces it (empty: no protocol, every study waits for the study
quiet period, for a comparison).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from node.demo.cases import DemoCase, generate_case
from node.demo.pacs import ASSOCIATION_CLOSE_DELAY
from node.demo.stack import NodeStack, choose_ports
from node.demo.verify import NodeReader, NodeView, last_reception
from node.errors import EndToEndError
from node.settings import Settings

POLL_SECONDS = 0.05
FINDINGS_KINDS = ("sr", "seg")  # what a reader needs first; overlays and super-resolved series are derived
#: the site protocol of the benchmark's node (MSKNODE_STUDY_PROTOCOLS): the series each phantom study sends
BENCH_STUDY_PROTOCOLS = "knee=sag_fluid,sag_pd,cor_fluid; shoulder=cor_fluid,cor_t1; lumbar_spine=sag_t2,sag_t1"
STEPS = ("forward", "completeness_wait", "queue_wait", "load", "inference", "writing", "other_job", "dispatch")


@dataclass
class StudyTiming:
    index: int
    study_uid: str
    instances: int
    arrived: bool
    total_s: float | None = None
    first_result_s: float | None = None
    findings_first: bool | None = None
    findings_dispatch_s: float | None = None
    steps: dict[str, float] = field(default_factory=dict)
    inference_per_model: dict[str, float] = field(default_factory=dict)
    results: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # result objects by kind (sr, seg, sc, superres)
    error: str | None = None


@dataclass
class BenchResult:
    studies: list[StudyTiming]
    warmup: StudyTiming | None
    settings: dict

    @property
    def totals(self) -> list[float]:
        return [s.total_s for s in self.studies if s.total_s is not None]

    @property
    def first_results(self) -> list[float]:
        return [s.first_result_s for s in self.studies if s.first_result_s is not None]

    @property
    def findings_first(self) -> bool:
        return bool(self.studies) and all(s.findings_first for s in self.studies)

    @property
    def all_arrived(self) -> bool:
        return bool(self.studies) and all(s.arrived for s in self.studies)

    def summary(self) -> dict:
        totals = self.totals
        breakdown: dict[str, object] = {}
        for step in STEPS:
            vals = [s.steps[step] for s in self.studies if step in s.steps]
            if vals:
                breakdown[f"{step}_s"] = round(statistics.median(vals), 3)
        models = sorted({m for s in self.studies for m in s.inference_per_model})
        fd = [s.findings_dispatch_s for s in self.studies if s.findings_dispatch_s is not None]
        if fd:
            breakdown["findings_dispatch_s"] = round(statistics.median(fd), 3)
        breakdown["inference_per_model_s"] = {
            m: round(
                statistics.median([s.inference_per_model[m] for s in self.studies if m in s.inference_per_model]), 3
            )
            for m in models
        }
        firsts = self.first_results
        return {
            "n": len(self.studies),
            "first_result_s": round(statistics.median(firsts), 3) if firsts else None,
            "first_result_p95_s": round(float(np.percentile(firsts, 95)), 3) if firsts else None,
            "findings_first": self.findings_first,
            "median_s": round(statistics.median(totals), 3) if totals else None,
            "p95_s": round(float(np.percentile(totals, 95)), 3) if totals else None,
            "min_s": round(min(totals), 3) if totals else None,
            "max_s": round(max(totals), 3) if totals else None,
            "all_arrived": self.all_arrived,
            "breakdown": breakdown,
            "warmup_s": self.warmup.total_s if self.warmup else None,
            "studies": [asdict(s) for s in self.studies],
            "settings": self.settings,
        }


def study_timing(index: int, view: NodeView, receptions, source_uids: list[str], instances: int) -> StudyTiming:
    """The latency of one delivered study and its breakdown."""
    result_uids = [r.sop_instance_uid for r in view.results]
    src = last_reception(receptions, source_uids)
    res = last_reception(receptions, result_uids)
    arrived = view.delivered and bool(result_uids) and all(u in receptions for u in result_uids)
    t = StudyTiming(index, view.study_uid, instances, arrived, results=len(result_uids))
    t.kinds = dict(sorted(Counter(r.kind for r in view.results).items()))
    if src is None or res is None:
        t.error = "no reception times in the Orthanc log"
        return t
    t.total_s = round((res - src).total_seconds(), 3)
    findings = [r.sop_instance_uid for r in view.results if r.kind in FINDINGS_KINDS]
    derived = [
        receptions[r.sop_instance_uid].at
        for r in view.results
        if r.kind not in FINDINGS_KINDS and r.sop_instance_uid in receptions
    ]
    sr = last_reception(receptions, [r.sop_instance_uid for r in view.results if r.kind == "sr"])
    if sr is not None:
        t.first_result_s = round((sr - src).total_seconds(), 3)
        published = view.finished_at
        if view.started_at is not None and (view.timings or {}).get("published_after") is not None:
            # findings first: the SR left when the job published its findings, before it was done
            published = view.started_at + dt.timedelta(seconds=float(view.timings["published_after"]))
        if published is not None:  # findings committed -> the SR in the PACS (not a step of the total)
            t.findings_dispatch_s = round((sr - published).total_seconds(), 3)
    last_finding = last_reception(receptions, findings)
    if last_finding is not None and all(u in receptions for u in findings):
        t.findings_first = not derived or last_finding < min(derived)
    tm = view.timings or {}

    def secs(a, b) -> float | None:
        return round((b - a).total_seconds(), 3) if a is not None and b is not None else None

    load = round(float(tm.get("load", 0.0)) + float(tm.get("load_context", 0.0)), 3)
    # super-resolution and its series run after the findings are published (steps superres, superres_results)
    inference = round(float(tm.get("inference", 0.0)) + float(tm.get("superres", 0.0)), 3)
    writing = round(
        float(tm.get("results", 0.0)) + float(tm.get("triage", 0.0)) + float(tm.get("superres_results", 0.0)), 3
    )
    steps = {
        "forward": secs(src, view.last_instance_at),
        "completeness_wait": secs(view.last_instance_at, view.created_at),
        "queue_wait": secs(view.created_at, view.started_at),
        "load": load,
        "inference": inference,
        "writing": writing,
        "dispatch": secs(view.finished_at, res),
    }
    job_s = secs(view.started_at, view.finished_at)
    if job_s is not None:
        steps["other_job"] = round(max(0.0, job_s - load - inference - writing), 3)
    t.steps = {k: v for k, v in steps.items() if v is not None}
    t.inference_per_model = {
        k.split(".", 1)[1]: round(float(v), 3)
        for k, v in tm.items()
        if k.startswith("inference.") and k != "inference.total"
    }
    return t


def run_bench(
    settings: Settings,
    *,
    studies: int,
    slices: int = 40,
    matrix: int = 384,
    warmup: int = 1,
    workdir: Path | None = None,
    timeout: float = 600.0,
    progress: Callable[[str], None] = print,
) -> BenchResult:
    if studies < 1:
        raise EndToEndError("--studies must be at least 1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    temp = workdir is None
    root = Path(workdir).resolve() if workdir is not None else Path(tempfile.mkdtemp(prefix="msknode-bench-e2e-"))
    stack: NodeStack | None = None
    try:
        for sub in ("orthanc", "node"):
            shutil.rmtree(root / sub, ignore_errors=True)
        cases = [
            DemoCase(f"bench-knee-{i:03d}", f"knee {i}", "knee", 5000 + i, {}, None, None, False)
            for i in range(warmup + studies)
        ]
        files = []
        for c in cases:
            t0 = time.monotonic()
            files.append(generate_case(c, root / "phantoms", n_slices=slices, matrix=matrix))
            progress(f"phantom {c.key}: {len(files[-1].files)} instances [{time.monotonic() - t0:.1f} s]")
        ports, _ = choose_ports(free=True)
        protocols = os.environ.get("MSKNODE_STUDY_PROTOCOLS", BENCH_STUDY_PROTOCOLS)
        stack = NodeStack(
            root,
            ports=ports,
            base_settings=settings,
            password=secrets.token_urlsafe(12),
            extra_env={"MSKNODE_STUDY_PROTOCOLS": protocols},
        )
        progress(
            "starting Orthanc and msknode serve (the shipped models activated by this benchmark's configuration: "
            f"MSKNODE_ACTIVATE_MODELS={','.join(stack.settings.activate_models)}; "
            f"MSKNODE_STUDY_PROTOCOLS={protocols!r}) ..."
        )
        stack.start()
        reader = NodeReader(stack.settings.data_dir / "msknode.db")
        timings: list[StudyTiming] = []
        warm: StudyTiming | None = None
        try:
            for i, cf in enumerate(files):
                # the PACS idle too: its routing job of the previous study has ended (see wait_routing_idle)
                stack.pacs.wait_routing_idle()
                stack.pacs.store_files(cf.files)
                deadline = time.monotonic() + timeout
                while True:
                    view = reader.view(cf.study_uid)
                    if view.delivered or view.failed:
                        break
                    if time.monotonic() > deadline:
                        break
                    stack.check_running()
                    time.sleep(POLL_SECONDS)
                if view.delivered:
                    # the last acknowledgement can be logged a moment after the outbox row says sent
                    for _ in range(40):
                        receptions = stack.pacs.receptions()
                        if all(r.sop_instance_uid in receptions for r in view.results):
                            break
                        time.sleep(0.05)
                else:
                    receptions = stack.pacs.receptions()
                t = study_timing(i - warmup, view, receptions, cf.sop_instance_uids, len(cf.files))
                if not view.delivered:
                    t.arrived = False
                    t.error = view.failed or f"not delivered within {timeout:.0f} s"
                label = "warm-up" if i < warmup else f"study {i - warmup + 1}/{studies}"
                if t.total_s is not None and t.arrived:
                    progress(
                        f"{label}: {t.total_s:.2f} s from PACS to results ({t.results} objects), "
                        f"SR after {t.first_result_s} s (findings first: {t.findings_first}) "
                        + " ".join(f"{k}={v:.2f}" for k, v in t.steps.items())
                    )
                else:
                    progress(f"{label}: results did not all arrive ({t.error})")
                if i >= warmup:
                    timings.append(t)
                elif not t.arrived:
                    raise EndToEndError(f"the warm-up study did not complete: {t.error}")
                else:
                    warm = t
        finally:
            reader.dispose()
        s = stack.settings
        return BenchResult(
            studies=timings,
            warmup=warm,
            settings={
                "slices_per_series": slices,
                "matrix": matrix,
                "quiet_seconds": s.quiet_seconds,
                "study_quiet_seconds": s.study_quiet_seconds,
                "study_protocols": protocols,
                "sweep_interval_seconds": s.sweep_interval_seconds,
                "torch_threads": s.torch_threads,
                "dispatch_associations": s.dispatch_associations,
                "orthanc_association_close_delay_s": ASSOCIATION_CLOSE_DELAY,
            },
        )
    finally:
        if stack is not None:
            stack.stop()
        if temp:
            shutil.rmtree(root, ignore_errors=True)


def format_report(result: BenchResult) -> str:
    s = result.summary()
    lines = [
        f"end-to-end latency, PACS -> results in the PACS, {s['n']} knee studies "
        f"({s['settings']['slices_per_series']} slices, {s['settings']['matrix']}x{s['settings']['matrix']}):",
        f"  findings (SR): median {s['first_result_s']} s   p95 {s['first_result_p95_s']} s   "
        f"(SR and SEG before every derived object: {s['findings_first']})",
        f"  everything:    median {s['median_s']} s   p95 {s['p95_s']} s   (min {s['min_s']}, max {s['max_s']}; "
        f"warm-up study {s['warmup_s']} s)   all arrived: {s['all_arrived']}",
        "  breakdown (median seconds):",
    ]
    for step in STEPS:
        v = s["breakdown"].get(f"{step}_s")
        if v is not None:
            lines.append(f"    {step:<18} {v:7.2f}")
    for m, v in s["breakdown"]["inference_per_model_s"].items():
        lines.append(f"      {m:<16} {v:7.2f}")
    if "findings_dispatch_s" in s["breakdown"]:
        lines.append(f"    (findings published -> SR in the PACS {s['breakdown']['findings_dispatch_s']:.2f})")
    return "\n".join(lines)

"""``msknode bench load``: a busy day. Knee, shoulder and spine studies arrive from Orthanc at a steady rate.

N whole phantom studies (each a 3-plane localizer plus the anatomy's usual series, see
`models.phantoms.write_study`), in the mix knee, shoulder, lumbar spine, knee, ... are sent into
Orthanc with ``storescu`` at ``rate`` studies per minute (one sender thread per study, so a slow
send never delays the next arrival); Orthanc forwards every MR instance to msknode (``msknode
serve`` as an operator starts it) and msknode sends its results back. One phantom per anatomy is
generated (and cached); every study is a copy with its own Study, Series, SOP Instance and Frame
of Reference UIDs.

For each study, as in ``bench e2e``:

    latency = last result object stored in Orthanc - last source instance stored in Orthanc

(Orthanc's reception log, microseconds). While the run lasts the benchmark samples, every
second, the queue depth (jobs waiting, jobs running, result objects not yet sent) from the
node's database and, every quarter second, the resident memory of every msknode process
(listener, worker and its pool processes, web) from ``/proc``; at the end it reads each one's
``VmHWM`` (the kernel's own peak) and the CPU seconds of msknode and of Orthanc.

*Exactly once*: a study counts when exactly one job of it is done (none superseded, failed or
repeated), Orthanc received every one of its result objects, and Orthanc holds exactly the sent
objects and that job's results (no second SR, no object of another attempt). An object received
twice with the same SOP Instance UID (a C-STORE resent because its response was lost: the PACS
keeps one copy) is counted apart, ``redelivered``.

Backends: the embedded default (SQLite and the filesystem broker under the run's directory), or
``database_url``/``broker_url`` (PostgreSQL, Redis: already running, given by URL; the database
should be empty). ``workers`` > 1 starts more ``msknode worker`` processes (queue ``cpu``) beside
``msknode serve``, as more worker machines would be.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from node.demo.cases import DemoCase, generate_case
from node.demo.pacs import RECEIVED_MARK, OrthancPacs, _log_time
from node.demo.stack import NodeStack, choose_ports
from node.demo.verify import NodeView, _view
from node.errors import EndToEndError
from node.settings import Settings

#: the arrival mix, in order: a hospital MSK list is mostly knees, then shoulders and spines
MIX = ("knee", "shoulder", "lumbar_spine", "knee", "shoulder", "knee")
#: p95 target of the busy day (seconds from the last image in the PACS to the last result there)
P95_TARGET_S = 60.0
POLL_SECONDS = 1.0
RSS_SAMPLE_SECONDS = 0.25
_RECEPTION_RE = re.compile(
    r"^[IWE](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) .*" + RECEIVED_MARK + r" (\S+) ?(\S*)"
)


# ---- the studies -------------------------------------------------------------------------------


@dataclass
class LoadStudy:
    index: int
    anatomy: str
    study_uid: str
    files: list[Path]
    sop_instance_uids: list[str]
    series: int
    sent_at: float | None = None  # monotonic, when its send started
    send_s: float | None = None
    send_error: str | None = None


def clone_study(src: list[Path], dest: Path, index: int, uid_prefix: str) -> tuple[str, list[Path], list[str], int]:
    """A copy of one phantom study with new UIDs (study, series, instances, frame of reference)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    mapped: dict[str, str] = {}

    def new_uid(old: str) -> str:
        if old not in mapped:
            mapped[old] = generate_uid(prefix=uid_prefix, entropy_srcs=["bench-load", str(index), old])
        return mapped[old]

    files: list[Path] = []
    uids: list[str] = []
    series: set[str] = set()
    study_uid = ""
    for n, path in enumerate(src):
        ds = dcmread(path)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                setattr(ds, kw, new_uid(str(getattr(ds, kw))))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"LOAD{index:05d}"
        out = dest / f"{n:04d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
        uids.append(str(ds.SOPInstanceUID))
        series.add(str(ds.SeriesInstanceUID))
        study_uid = str(ds.StudyInstanceUID)
    return study_uid, files, uids, len(series)


def prepare_studies(
    root: Path,
    n: int,
    *,
    slices: int,
    matrix: int,
    uid_prefix: str,
    progress: Callable[[str], None],
    offset: int = 0,
) -> list[LoadStudy]:
    """``n`` studies of the mix; the first ``offset`` ones come before it (the warm-up: knee for 1)."""
    templates: dict[str, list[Path]] = {}
    studies: list[LoadStudy] = []
    for i in range(n):
        anatomy = MIX[(i - offset) % len(MIX)]
        if anatomy not in templates:
            t0 = time.monotonic()
            case = DemoCase(f"load-{anatomy}", anatomy, anatomy, 9100 + len(templates), {}, None, None, False)
            templates[anatomy] = generate_case(case, root / "phantoms", n_slices=slices, matrix=matrix).files
            progress(f"phantom {anatomy}: {len(templates[anatomy])} instances [{time.monotonic() - t0:.1f} s]")
        study_uid, files, uids, series = clone_study(templates[anatomy], root / "studies" / f"{i:04d}", i, uid_prefix)
        studies.append(LoadStudy(i, anatomy, study_uid, files, uids, series))
    return studies


# ---- processes: memory and CPU -----------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (bytes) of a process, {} when it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def tree_peak_rss_mb(pid: int) -> dict[int, float]:
    """Pid -> peak RSS (VmHWM, MB) of a process and every process below it that is alive now."""
    out: dict[int, float] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        st = _status(p)
        if st:
            out[p] = round(st.get("VmHWM", 0) / 2**20, 1)
            todo += _children(p)
    return out


def _role(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode(errors="replace") for a in argv]
    for part in ("listen", "worker", "web", "serve"):
        if part in words:
            return part
    return None


class ProcessWatch:
    """Samples the RSS of every msknode process below the given roots; keeps VmHWM and CPU of each."""

    def __init__(self, roots: Callable[[], list[int]]):
        self.roots = roots
        self.samples: list[tuple[float, dict[str, int]]] = []  # (unix time, role -> max RSS of one process)
        self.procs: dict[int, dict] = {}  # pid -> role, hwm, cpu, main (False for a pool/child process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load-rss", daemon=True)

    def tree(self) -> list[tuple[int, str, bool]]:
        out: list[tuple[int, str, bool]] = []
        todo: list[tuple[int, str | None]] = [(p, None) for p in self.roots()]
        while todo:
            pid, parent_role = todo.pop()
            role = _role(pid) or parent_role
            if role is None:
                continue
            out.append((pid, role, parent_role != role))
            todo += [(c, role) for c in _children(pid)]
        return out

    def sample(self) -> None:
        now = time.time()
        by_role: dict[str, int] = {}
        for pid, role, main in self.tree():
            st = _status(pid)
            if not st:
                continue
            cpu = _cpu_seconds(pid)
            rec = self.procs.setdefault(pid, {"role": role, "main": main, "hwm": 0, "cpu": 0.0})
            rec["hwm"] = max(rec["hwm"], st.get("VmHWM", 0), st.get("VmRSS", 0))
            if cpu is not None:
                rec["cpu"] = cpu
            by_role[role] = max(by_role.get(role, 0), st.get("VmRSS", 0))
        self.samples.append((now, by_role))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def peak(self, role: str, start: float, end: float) -> int:
        """The largest RSS of one ``role`` process sampled between two unix times."""
        return max((s.get(role, 0) for t, s in self.samples if start <= t <= end), default=0)

    def summary(self, cpu0: dict[int, float] | None = None) -> dict[str, dict]:
        """Per role: processes, peak RSS (VmHWM) and CPU seconds (since ``cpu0``, pid -> CPU seconds then)."""
        out: dict[str, dict] = {}
        for pid, rec in self.procs.items():
            d = out.setdefault(rec["role"], {"processes": 0, "peak_rss_mb": 0.0, "cpu_s": 0.0})
            d["processes"] += 1
            d["peak_rss_mb"] = round(max(d["peak_rss_mb"], rec["hwm"] / 2**20), 1)
            d["cpu_s"] = round(d["cpu_s"] + rec["cpu"] - (cpu0 or {}).get(pid, 0.0), 1)
        return out


# ---- the node's database -------------------------------------------------------------------------


class LoadReader:
    """Read access to the node's database (SQLite read-only, or the server database)."""

    def __init__(self, database_url: str):
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        if database_url.startswith("sqlite:///"):
            path = Path(database_url[len("sqlite:///") :]).resolve()
            self.engine = create_engine(
                f"sqlite:///file:{path}?mode=ro&uri=true", connect_args={"timeout": 30, "check_same_thread": False}
            )
        else:
            self.engine = create_engine(database_url, pool_size=2)
        self.sessions = sessionmaker(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def view(self, study_uid: str) -> NodeView:
        with self.sessions() as s:
            return _view(s, study_uid)

    def jobs_per_study(self, study_uid: str) -> Counter:
        from sqlalchemy import select

        from node.db.schema import Job, Study

        with self.sessions() as s:
            return Counter(
                s.scalars(select(Job.state).join(Study, Study.id == Job.study_id).where(Study.study_uid == study_uid))
            )

    def depth(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from node.db.schema import Job, OutboxItem

        with self.sessions() as s:
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            outbox = int(s.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.state != "sent")) or 0)
        return {
            "jobs_waiting": int(jobs.get("pending", 0)) + int(jobs.get("queued", 0)),
            "jobs_running": int(jobs.get("processing", 0)),
            "jobs_done": int(jobs.get("done", 0)),
            "outbox_unsent": outbox,
        }


def reception_counts(log_path: Path) -> dict[str, list[dt.datetime]]:
    """SOP Instance UID -> every time Orthanc received it (its reception log)."""
    now = dt.datetime.now(dt.UTC)
    out: dict[str, list[dt.datetime]] = {}
    if not log_path.exists():
        return out
    with open(log_path, errors="replace") as fh:
        for line in fh:
            if RECEIVED_MARK not in line:
                continue
            m = _RECEPTION_RE.match(line)
            if m is None:
                continue
            month, day, hh, mm, ss, us, uid, _aet = m.groups()
            out.setdefault(uid, []).append(_log_time(now, int(month), int(day), int(hh), int(mm), int(ss), int(us)))
    return out


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    index: int
    anatomy: str
    study_uid: str
    instances: int
    series: int
    latency_s: float | None = None
    results: int = 0
    once: bool = False
    redelivered: int = 0  # result objects Orthanc received more than once (a C-STORE resent after a lost response)
    job_states: dict[str, int] = field(default_factory=dict)
    worker_peak_rss_mb: float | None = None
    error: str | None = None


@dataclass
class LoadResult:
    studies: list[StudyOutcome]
    rate_per_min: float
    wall_s: float
    queue: list[dict]
    processes: dict[str, dict]
    orthanc_cpu_s: float | None
    settings: dict

    def summary(self) -> dict:
        lat = [s.latency_s for s in self.studies if s.latency_s is not None]
        done = [s for s in self.studies if s.latency_s is not None]
        p95 = round(float(np.percentile(lat, 95)), 2) if lat else None
        per_type: dict[str, dict] = {}
        for s in self.studies:
            d = per_type.setdefault(s.anatomy, {"n": 0, "median_s": None, "worker_peak_rss_mb": 0.0})
            d["n"] += 1
            if s.worker_peak_rss_mb is not None:
                d["worker_peak_rss_mb"] = max(d["worker_peak_rss_mb"], s.worker_peak_rss_mb)
        for anatomy, d in per_type.items():
            vals = [s.latency_s for s in self.studies if s.anatomy == anatomy and s.latency_s is not None]
            d["median_s"] = round(statistics.median(vals), 2) if vals else None
        cpu_total = sum(p["cpu_s"] for p in self.processes.values())
        return {
            "n": len(self.studies),
            "rate_per_min": self.rate_per_min,
            "offered_studies_per_hour": round(self.rate_per_min * 60, 1),
            "studies_per_hour": round(len(done) * 3600.0 / self.wall_s, 1) if self.wall_s > 0 else None,
            "wall_s": round(self.wall_s, 1),
            "median_s": round(statistics.median(lat), 2) if lat else None,
            "p95_s": p95,
            "max_s": round(max(lat), 2) if lat else None,
            "p95_within_60s": p95 is not None and p95 <= P95_TARGET_S and len(lat) == len(self.studies),
            "all_once": bool(self.studies) and all(s.once for s in self.studies),
            "redelivered_objects": sum(s.redelivered for s in self.studies),
            "completed": len(done),
            "per_type": per_type,
            "queue_max": {
                k: max((q[k] for q in self.queue), default=0) for k in ("jobs_waiting", "jobs_running", "outbox_unsent")
            },
            "queue": self.queue,
            "cpu": {
                "msknode_cpu_s": round(cpu_total, 1),
                "msknode_cores_mean": round(cpu_total / self.wall_s, 2) if self.wall_s > 0 else None,
                "orthanc_cpu_s": self.orthanc_cpu_s,
                "load_average": list(os.getloadavg()),
            },
            "memory": {
                "worker_peak_rss_mb": max(
                    (p["peak_rss_mb"] for r, p in self.processes.items() if r == "worker"), default=None
                ),
                "listener_peak_rss_mb": self.processes.get("listen", {}).get("peak_rss_mb"),
                "worker_peak_rss_mb_per_type": {a: d["worker_peak_rss_mb"] for a, d in per_type.items()},
            },
            "processes": self.processes,
            "studies": [asdict(s) for s in self.studies],
            "settings": self.settings,
        }


def _worker_env(stack: NodeStack) -> dict[str, str]:
    env = stack.node_env()
    env["MSKNODE_WORKER_QUEUES"] = "cpu"  # an extra worker machine: inference only, no housekeeping
    return env


def run_bench(
    settings: Settings,
    *,
    studies: int,
    rate: float,
    slices: int = 40,
    matrix: int = 384,
    workers: int = 1,
    warmup: int = 1,
    database_url: str | None = None,
    broker_url: str | None = None,
    workdir: Path | None = None,
    timeout: float = 900.0,
    progress: Callable[[str], None] = print,
) -> LoadResult:
    """Sends ``studies`` studies at ``rate`` per minute; waits until every one has its results (or ``timeout``
    after the last send)."""
    if studies < 1 or rate <= 0 or workers < 1:
        raise EndToEndError("--studies >= 1, --rate > 0 and --workers >= 1 are required")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    temp = workdir is None
    root = Path(workdir).resolve() if workdir is not None else Path(tempfile.mkdtemp(prefix="msknode-bench-load-"))
    stack: NodeStack | None = None
    extra: list[subprocess.Popen] = []
    watch: ProcessWatch | None = None
    try:
        for sub in ("orthanc", "node", "studies"):
            shutil.rmtree(root / sub, ignore_errors=True)
        load = prepare_studies(
            root,
            studies + warmup,
            slices=slices,
            matrix=matrix,
            uid_prefix="1.2.826.0.1.3680043.10.1417.",
            progress=progress,
            offset=warmup,
        )
        warm, load = load[:warmup], load[warmup:]
        for i, st in enumerate(load):
            st.index = i
        ports, _ = choose_ports(free=True)
        env: dict[str, str] = {}
        if database_url:
            env["MSKNODE_DATABASE_URL"] = database_url
        if broker_url:
            env["MSKNODE_BROKER_URL"] = broker_url
        stack = NodeStack(root, ports=ports, base_settings=settings, password=secrets.token_urlsafe(12), extra_env=env)
        if database_url or broker_url:
            stack.settings = stack.settings.model_copy(
                update={k: v for k, v in (("database_url", database_url), ("broker_url", broker_url)) if v}
            )
        backend = (
            f"{str(stack.settings.database_url).split(':', 1)[0]} + {str(stack.settings.broker_url).split(':', 1)[0]}"
        )
        progress(f"starting Orthanc and msknode serve ({backend}, {workers} worker process(es)) ...")
        stack.start()
        for _ in range(workers - 1):
            with open(root / "worker-extra.log", "ab") as fh:
                extra.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "node.cli", "worker"],
                        env=_worker_env(stack),
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        cwd=stack.node_dir,
                        start_new_session=True,
                    )
                )
        serve = stack._serve
        watch = ProcessWatch(lambda: [p.pid for p in ([serve] if serve else []) + extra])
        watch.start()
        reader = LoadReader(str(stack.settings.database_url))
        pacs: OrthancPacs = stack.pacs
        for st in warm:  # untimed: the worker loads torch and the models
            t0 = time.monotonic()
            pacs.store_files(st.files, timeout=timeout)
            while not reader.view(st.study_uid).delivered:
                stack.check_running()
                if time.monotonic() - t0 > timeout:
                    raise EndToEndError(f"the warm-up study did not complete within {timeout:.0f} s")
                time.sleep(POLL_SECONDS)
            progress(f"warm-up study ({st.anatomy}) delivered in {time.monotonic() - t0:.1f} s (not counted)")
        watch.samples.clear()
        orthanc_cpu0 = _cpu_seconds(pacs.pid) if pacs.pid else None
        cpu0 = {pid: rec["cpu"] for pid, rec in watch.procs.items()}
        interval = 60.0 / rate
        queue: list[dict] = []
        done: dict[str, NodeView] = {}
        failed: dict[str, str] = {}
        t_start = time.monotonic()
        wall0 = time.time()
        progress(f"sending {studies} studies at {rate:g}/min (one every {interval:.1f} s)")

        def send(st: LoadStudy) -> None:
            delay = t_start + st.index * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            st.sent_at = time.monotonic()
            try:
                pacs.store_files(st.files, timeout=timeout)
            except EndToEndError as e:
                st.send_error = str(e)
            st.send_s = round(time.monotonic() - st.sent_at, 2)

        last_done = t_start
        try:
            with ThreadPoolExecutor(max_workers=min(studies, 16), thread_name_prefix="bench-load-send") as pool:
                futures = [pool.submit(send, st) for st in load]
                deadline: float | None = None
                while True:
                    stack.check_running()
                    t = time.monotonic()
                    q: dict[str, float] = dict(reader.depth())
                    q["t_s"] = round(t - t_start, 1)
                    for st in load:
                        if st.study_uid in done or st.study_uid in failed or st.sent_at is None:
                            continue
                        v = reader.view(st.study_uid)
                        if v.delivered:
                            done[st.study_uid] = v
                            last_done = t
                            progress(
                                f"[{t - t_start:6.1f} s] study {st.index + 1}/{studies} ({st.anatomy}) delivered "
                                f"({len(done)} done; waiting {q['jobs_waiting']}, running {q['jobs_running']}, "
                                f"unsent {q['outbox_unsent']})"
                            )
                        elif v.failed:
                            failed[st.study_uid] = v.failed
                            progress(f"study {st.index + 1} ({st.anatomy}) failed: {v.failed}")
                    q["completed"] = len(done)
                    queue.append(q)
                    if len(done) + len(failed) == studies:
                        break
                    if deadline is None and all(f.done() for f in futures):
                        deadline = time.monotonic() + timeout
                    if deadline is not None and time.monotonic() > deadline:
                        progress(f"stopped waiting: {studies - len(done) - len(failed)} studies without results")
                        break
                    time.sleep(POLL_SECONDS)
            wall = last_done - t_start
            time.sleep(2.0)  # late acknowledgements and any duplicate deliveries show up in the log
            watch.stop()
            receptions = reception_counts(pacs.log_path)
            outcomes = []
            for st in load:
                o = StudyOutcome(st.index, st.anatomy, st.study_uid, len(st.files), st.series)
                o.job_states = dict(reader.jobs_per_study(st.study_uid))
                v = done.get(st.study_uid) or reader.view(st.study_uid)
                o.results = len(v.results)
                o.error = st.send_error or failed.get(st.study_uid)
                src = [max(receptions[u]) for u in st.sop_instance_uids if u in receptions]
                res = [receptions.get(r.sop_instance_uid, []) for r in v.results]
                if v.delivered and src and all(res):
                    o.latency_s = round((max(min(r) for r in res) - max(src)).total_seconds(), 2)
                if v.started_at and v.finished_at:
                    peak = watch.peak("worker", v.started_at.timestamp(), v.finished_at.timestamp())
                    o.worker_peak_rss_mb = round(peak / 2**20, 1) if peak else None
                in_pacs = pacs.study_instance_uids(st.study_uid) if v.delivered else set()
                expected = set(st.sop_instance_uids) | {r.sop_instance_uid for r in v.results}
                o.redelivered = sum(1 for r in res if len(r) > 1)
                o.once = v.delivered and o.job_states.get("done", 0) == 1 and all(res) and in_pacs == expected
                if v.delivered and not o.once and o.error is None:
                    o.error = (
                        f"jobs {o.job_states}, {sum(1 for r in res if not r)} result(s) never received, "
                        f"{len(in_pacs - expected)} unexpected and {len(expected - in_pacs)} missing object(s) in Orthanc"
                    )
                outcomes.append(o)
            orthanc_cpu = _cpu_seconds(pacs.pid) if pacs.pid else None
        finally:
            reader.dispose()
        s = stack.settings
        return LoadResult(
            studies=outcomes,
            rate_per_min=rate,
            wall_s=max(wall, 1e-3),
            queue=queue,
            processes=watch.summary(cpu0),
            orthanc_cpu_s=round(orthanc_cpu - orthanc_cpu0, 1)
            if orthanc_cpu is not None and orthanc_cpu0 is not None
            else None,
            settings={
                "backend": backend,
                "workers": workers,
                "worker_concurrency": s.worker_concurrency,
                "warmup_studies": warmup,
                "slices_per_series": slices,
                "matrix": matrix,
                "mix": list(MIX),
                "wall_clock_start": dt.datetime.fromtimestamp(wall0, dt.UTC).isoformat(timespec="seconds"),
                "cpus": os.cpu_count(),
            },
        )
    finally:
        if watch is not None:
            watch.stop()
        for p in extra:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        if stack is not None:
            stack.stop()
        if temp:
            shutil.rmtree(root, ignore_errors=True)


def format_report(result: LoadResult) -> str:
    s = result.summary()
    lines = [
        f"busy day: {s['n']} studies at {s['rate_per_min']:g}/min ({s['offered_studies_per_hour']} offered per hour), "
        f"{s['settings']['backend']}, {s['settings']['workers']} worker process(es):",
        f"  throughput {s['studies_per_hour']} studies/h ({s['completed']} completed in {s['wall_s']} s)",
        f"  latency median {s['median_s']} s   p95 {s['p95_s']} s   max {s['max_s']} s   "
        f"(p95 <= 60 s: {s['p95_within_60s']})   every study's results exactly once: {s['all_once']} "
        f"({s['redelivered_objects']} object(s) resent after a lost C-STORE response)",
        f"  queue max: {s['queue_max']}",
        f"  CPU: msknode {s['cpu']['msknode_cpu_s']} s ({s['cpu']['msknode_cores_mean']} cores on average), "
        f"Orthanc {s['cpu']['orthanc_cpu_s']} s; load average {s['cpu']['load_average']}",
        f"  peak RSS (VmHWM): worker {s['memory']['worker_peak_rss_mb']} MB, listener "
        f"{s['memory']['listener_peak_rss_mb']} MB; worker per study type {s['memory']['worker_peak_rss_mb_per_type']}",
    ]
    for a, d in s["per_type"].items():
        lines.append(f"    {a:<13} n={d['n']:<3} median {d['median_s']} s")
    for st in s["studies"]:
        if st["error"]:
            lines.append(f"  study {st['index'] + 1} ({st['anatomy']}): {st['error']}")
    return "\n".join(lines)

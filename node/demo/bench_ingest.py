"""``msknode bench ingest``: C-STORE throughput of msknode against Orthanc and dcmtk storescp.

One MR set (default 10 series x 40 slices, 384x384, 16-bit, explicit VR little endian) is
sent with dcmtk ``storescu`` (TCP_NODELAY=1) to each receiver, once over one association
and once over 4 parallel associations (the set split in four), each time into a fresh,
empty receiver. Reported: instances/s, MB/s and the ratios msknode/Orthanc and
msknode/storescp. For msknode every instance is then checked in the index and in the
store (the stored data set bytes hash to what was sent): `all_arrived`.

Receivers: msknode (``msknode listen``, SQLite, every instance fsynced and indexed before
Success) twice, with its fast transport (``msknode``, the default) and with stock
pynetdicom (``msknode-stock``, MSKNODE_FAST_TRANSPORT=0), Orthanc (Debian package, SQLite
index, default durability: SyncStorageArea) and storescp (writes files, no index, no fsync)
as the upper bound. The receivers take turns within each round, so a busy machine slows
them alike; with ``--repeat`` the ratios use the medians. Before each receiver starts,
``sync`` writes out what the previous one left to the kernel's writeback.

Each receiver is first sent a warm-up of `WARMUP_PER_ASSOCIATION` other instances per
association (the same way, not timed), so that what is measured is the receiver serving, not
its processes' first calls (lazy imports, statements compiled on first use, caches filled): a
node runs for weeks, and its start is not what a PACS waits for. ``--warmup 0`` leaves it out.

Each run also reports the CPU time (user + system) its receiver's processes spent over the
send, per instance (``cpu_ms``; from ``/proc/<pid>/stat`` of the receiver and every process
below it): on a shared machine it moves far less with the other load than instances/s does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.demo.loopback import child_env, echoscu, free_port
from node.demo.orthanc import OrthancProcess
from node.errors import NodeError

SLICES_PER_SERIES = 40
ROWS = COLUMNS = 384
MODES = (("single", 1), ("parallel", 4))
RECEIVERS = ("msknode", "msknode-stock", "orthanc", "storescp")
MSKNODE_RECEIVERS = ("msknode", "msknode-stock")


@dataclass
class Run:
    receiver: str
    mode: str
    associations: int
    instances: int
    seconds: float
    bytes: int
    arrived: bool
    note: str = ""
    peak_rss_mb: float | None = None  # the largest VmHWM of one of its processes (msknode: a listener)
    cpu_ms: float | None = None  # CPU time (user + system) of the receiver's processes over the send, per instance

    @property
    def ips(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BenchResult:
    instances: int
    listener_processes: int
    warmup: int = 0  # instances per association sent (untimed) before each timed send
    runs: list[Run] = field(default_factory=list)
    load_start: tuple[float, ...] = field(default_factory=os.getloadavg)

    def ips(self, receiver: str, mode: str) -> float:
        """The median over repeated runs (one run unless --repeat)."""
        values = sorted(r.ips for r in self.runs if r.receiver == receiver and r.mode == mode)
        if not values:
            return 0.0
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def cpu_ms(self, receiver: str, mode: str) -> float | None:
        """The median CPU time per instance of the receiver's processes over the repeated runs."""
        values = sorted(
            r.cpu_ms for r in self.runs if r.receiver == receiver and r.mode == mode and r.cpu_ms is not None
        )
        if not values:
            return None
        mid = len(values) // 2
        return round(values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2, 3)

    def peak_rss(self, mode: str) -> float | None:
        values = [r.peak_rss_mb for r in self.runs if r.receiver == "msknode" and r.mode == mode and r.peak_rss_mb]
        return max(values) if values else None

    @property
    def all_arrived(self) -> bool:
        return bool(self.runs) and all(r.arrived for r in self.runs if r.receiver in MSKNODE_RECEIVERS)

    def summary(self) -> dict:
        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 3) if a and b else None

        m1, m4 = self.ips("msknode", "single"), self.ips("msknode", "parallel")
        k1, k4 = self.ips("msknode-stock", "single"), self.ips("msknode-stock", "parallel")
        o1, o4 = self.ips("orthanc", "single"), self.ips("orthanc", "parallel")
        s1, s4 = self.ips("storescp", "single"), self.ips("storescp", "parallel")
        return {
            "instances": self.instances,
            "listener_processes": self.listener_processes,
            "warmup_per_association": self.warmup,
            "msknode_ips": round(m1, 1),
            "msknode_stock_ips": round(k1, 1),
            "orthanc_ips": round(o1, 1),
            "storescp_ips": round(s1, 1),
            "msknode_parallel_ips": round(m4, 1),
            "msknode_stock_parallel_ips": round(k4, 1),
            "orthanc_parallel_ips": round(o4, 1),
            "storescp_parallel_ips": round(s4, 1),
            "ratio_orthanc": ratio(m1, o1),
            "ratio_storescp": ratio(m1, s1),
            "ratio_orthanc_parallel": ratio(m4, o4),
            "ratio_storescp_parallel": ratio(m4, s4),
            "ratio_orthanc_stock": ratio(k1, o1),
            "ratio_orthanc_stock_parallel": ratio(k4, o4),
            # the fast transport's gain: msknode with it / msknode with stock pynetdicom
            "ratio_fast_stock": ratio(m1, k1),
            "ratio_fast_stock_parallel": ratio(m4, k4),
            # CPU time of the receiver's processes over the send, ms per instance (medians)
            **{
                f"{prefix}{suffix}_cpu_ms": self.cpu_ms(receiver, mode)
                for receiver, prefix in (
                    ("msknode", "msknode"),
                    ("msknode-stock", "msknode_stock"),
                    ("orthanc", "orthanc"),
                    ("storescp", "storescp"),
                )
                for mode, suffix in (("single", ""), ("parallel", "_parallel"))
            },
            "load_average_start": [round(x, 2) for x in self.load_start],
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "all_arrived": self.all_arrived,
            # the largest VmHWM of one msknode listener process over the runs, one and four associations
            "msknode_listener_peak_rss_mb": self.peak_rss("single"),
            "msknode_listener_parallel_peak_rss_mb": self.peak_rss("parallel"),
            "runs": [dict(asdict(r), ips=round(r.ips, 1), mbps=round(r.mbps, 1)) for r in self.runs],
        }


# ---- the MR set ---------------------------------------------------------------------------


def generate_mr_set(out: Path, instances: int, *, seed: int = 0) -> list[Path]:
    """Writes `instances` MR images (series of 40 slices, 384x384 uint16) to `out`."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS]
    phantom = (1500 * np.exp(-(((yy - 192) / 120.0) ** 2 + ((xx - 192) / 90.0) ** 2))).astype(np.float32)
    study = generate_uid()
    paths: list[Path] = []
    series_uid = ""
    for i in range(instances):
        s, k = divmod(i, SLICES_PER_SERIES)
        if k == 0:
            series_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "MR"
        ds.PatientName = "BENCH^INGEST"
        ds.PatientID = "BENCH0001"
        ds.StudyDate = "20240101"
        ds.BodyPartExamined = "KNEE"
        ds.SeriesDescription = f"BENCH SERIES {s + 1}"
        ds.SeriesNumber = s + 1
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = SLICES_PER_SERIES
        ds.ImagePositionPatient = [-96.0, -96.0, float(k * 3)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        noise = rng.normal(0, 40, (ROWS, COLUMNS)).astype(np.float32)
        ds.PixelData = np.clip(phantom * (1 + 0.01 * k) + noise, 0, 4095).astype(np.uint16).tobytes()
        path = out / f"s{s:03d}_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _dataset_digest(path: Path) -> tuple[str, str]:
    """(SOP Instance UID, sha256 of the data set bytes after the file meta) of a DICOM file."""
    from pydicom.filereader import read_file_meta_info

    from node.receive.storage import dataset_offset

    meta = read_file_meta_info(path)
    data = path.read_bytes()[dataset_offset(path) :]
    return str(meta.MediaStorageSOPInstanceUID), hashlib.sha256(data).hexdigest()


# ---- helpers ---------------------------------------------------------------------------------


def _wait_echo(port: int, aet: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NodeError(f"the receiver exited with code {proc.returncode} before accepting associations")
        if echoscu(port, aet, timeout=2):
            return
        time.sleep(0.2)
    raise NodeError(f"the receiver on port {port} did not answer C-ECHO within {timeout:.0f} s")


def tree_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and every process below it that is alive now."""
    from node.demo.bench_load import _children

    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo += _children(p)
    return total


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(files: list[Path], port: int, aet: str, associations: int) -> float:
    """Sends `files` with `associations` parallel storescu processes; returns the wall time."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", str(port), *map(str, chunk)],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
        if chunk
    ]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.decode(errors="replace").strip()[-300:])
    elapsed = time.perf_counter() - t0
    if errors:
        raise NodeError("storescu failed: " + " | ".join(errors))
    return elapsed


# ---- receivers -------------------------------------------------------------------------------


class Receiver:
    name = ""
    aet = ""

    def start(self, workdir: Path) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def arrived(self, expected: dict[str, str]) -> tuple[bool, str]:
        raise NotImplementedError

    def peak_rss_mb(self) -> float | None:
        """The largest peak RSS (VmHWM) of one of the receiver's processes (msknode: the listeners); None: not read."""
        return None

    def pid(self) -> int | None:
        """The receiver's process (its CPU time is counted with the processes below it)."""
        proc = getattr(self, "proc", None)
        return proc.pid if proc is not None else None


class MsknodeReceiver(Receiver):
    name, aet = "msknode", "MSKNODE"

    def __init__(self, listener_processes: int, *, fast_transport: bool = True):
        self.listener_processes = listener_processes
        self.fast_transport = fast_transport
        if not fast_transport:
            self.name = "msknode-stock"
        self.proc: subprocess.Popen | None = None
        self.data_dir: Path | None = None

    def start(self, workdir: Path) -> int:
        self.data_dir = workdir / "msknode"
        port = free_port()
        env = child_env(
            MSKNODE_DATA_DIR=str(self.data_dir),
            MSKNODE_PORT=str(port),
            MSKNODE_AE_TITLE=self.aet,
            MSKNODE_LISTENER_PROCESSES=str(self.listener_processes),
            MSKNODE_FAST_TRANSPORT="1" if self.fast_transport else "0",
            MSKNODE_LOG_LEVEL="WARNING",
        )
        with open(workdir / "msknode.log", "wb") as log_file:  # the listener keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "listen"], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        _wait_echo(port, self.aet, self.proc)
        return port

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def peak_rss_mb(self) -> float | None:
        from node.demo.bench_load import tree_peak_rss_mb

        peaks = tree_peak_rss_mb(self.proc.pid) if self.proc is not None else {}
        return max(peaks.values()) if peaks else None

    def arrived(self, expected: dict[str, str]) -> tuple[bool, str]:
        """Every sent instance has an index row and a stored file whose data set bytes match."""
        from node.receive.storage import dataset_offset

        if self.data_dir is None:
            raise NodeError("the msknode receiver was not started")
        db = sqlite3.connect(str(self.data_dir / "msknode.db"))
        try:
            rows = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
        finally:
            db.close()
        missing = [uid for uid in expected if uid not in rows]
        if missing:
            return False, f"{len(missing)} instance(s) missing from the index"
        bad = 0
        for uid, digest in expected.items():
            path = Path(rows[uid])
            try:
                data = path.read_bytes()[dataset_offset(path) :]
            except (OSError, NodeError):
                bad += 1
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                bad += 1
        if bad:
            return False, f"{bad} stored file(s) missing or different from what was sent"
        return True, ""


class _BenchOrthanc(OrthancProcess):
    """Orthanc as a plain C-STORE receiver: no auth, any called AE title, no compression, no plugins."""

    def config(self) -> dict:
        return {
            "Name": "msknode-bench",
            **super().config(),
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "Plugins": [],
        }


class OrthancReceiver(Receiver):
    name, aet = "orthanc", "ORTHANC"

    def start(self, workdir: Path) -> int:
        self.orthanc = _BenchOrthanc(workdir, dicom_port=free_port(), http_port=free_port(), aet=self.aet).start()
        return self.orthanc.dicom_port

    def stop(self) -> None:
        orthanc = getattr(self, "orthanc", None)
        if orthanc is not None:
            orthanc.stop()

    def pid(self) -> int | None:
        return self.orthanc.pid

    def arrived(self, expected: dict[str, str]) -> tuple[bool, str]:
        count = int(self.orthanc.get("/statistics")["CountInstances"])
        return count == len(expected), f"{count} instances in Orthanc"


class StorescpReceiver(Receiver):
    name, aet = "storescp", "STORESCP"

    def start(self, workdir: Path) -> int:
        self.out = workdir / "storescp"
        self.out.mkdir()
        port = free_port()
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "--output-directory", str(self.out), str(port)],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_echo(port, self.aet, self.proc)
        return port

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            _stop(proc)

    def arrived(self, expected: dict[str, str]) -> tuple[bool, str]:
        count = sum(1 for _ in self.out.iterdir())
        return count == len(expected), f"{count} files written by storescp"


# ---- the benchmark ---------------------------------------------------------------------------


#: instances sent per association before each timed send (not timed, checked as arrived like the rest)
WARMUP_PER_ASSOCIATION = 4


def run_bench(
    *,
    instances: int = 400,
    warmup: int = WARMUP_PER_ASSOCIATION,
    input_dir: Path | None = None,
    workdir: Path | None = None,
    listener_processes: int = 1,
    receivers: tuple[str, ...] = RECEIVERS,
    repeat: int = 1,
    progress=print,
) -> BenchResult:
    for tool in ("storescu", "echoscu", "storescp"):
        if not shutil.which(tool):
            raise NodeError(f"{tool} not found (Debian package dcmtk)")
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="msknode-bench-", dir=workdir))
    try:
        if input_dir is not None:
            files = sorted(p for p in Path(input_dir).rglob("*") if p.is_file())
            if not files:
                raise NodeError(f"no files in {input_dir}")
        else:
            progress(f"generating {instances} MR instances ({ROWS}x{COLUMNS}, 16-bit) in {root / 'set'}")
            files = generate_mr_set(root / "set", instances)
        expected = dict(_dataset_digest(p) for p in files)
        most = max(associations for _, associations in MODES)
        warm = generate_mr_set(root / "warmup", warmup * most, seed=1) if warmup > 0 else []
        warm_expected = {p: _dataset_digest(p) for p in warm}
        total_bytes = sum(p.stat().st_size for p in files)
        result = BenchResult(instances=len(files), listener_processes=listener_processes, warmup=warmup)
        factories = {
            "msknode": lambda: MsknodeReceiver(listener_processes),
            "msknode-stock": lambda: MsknodeReceiver(listener_processes, fast_transport=False),
            "orthanc": OrthancReceiver,
            "storescp": StorescpReceiver,
        }
        rounds = [(k, mode, associations) for k in range(repeat) for mode, associations in MODES]
        for k, mode, associations in rounds:
            for name in receivers:
                receiver = factories[name]()
                work = root / f"{name}-{mode}-{k}"
                work.mkdir()
                # what the previous receiver wrote goes to disk now, not during this one's send
                # (storescp leaves its files to the kernel's writeback; a receiver that fsyncs
                # would otherwise wait for that too)
                os.sync()
                try:  # (a receiver that never answers C-ECHO is stopped too)
                    port = receiver.start(work)
                    warm_files = warm[: warmup * associations]
                    if warm_files:
                        send(warm_files, port, receiver.aet, associations)
                    cpu_before = tree_cpu_seconds(receiver.pid())
                    seconds = send(files, port, receiver.aet, associations)
                    cpu_after = tree_cpu_seconds(receiver.pid())
                    ok, note = receiver.arrived(expected | dict(warm_expected[p] for p in warm_files))
                    peak = receiver.peak_rss_mb()  # before it stops: VmHWM of its live processes
                finally:
                    receiver.stop()
                cpu = None
                if cpu_before is not None and cpu_after is not None:
                    cpu = round((cpu_after - cpu_before) / len(files) * 1000, 3)
                run = Run(name, mode, associations, len(files), seconds, total_bytes, ok, note, peak, cpu)
                result.runs.append(run)
                progress(
                    f"{name:13s} {associations} association(s): {run.ips:7.1f} instances/s "
                    f"{run.mbps:6.1f} MB/s"
                    + (f", {cpu:.2f} ms CPU per instance" if cpu is not None else "")
                    + ("" if ok else "  NOT ALL ARRIVED: " + note)
                )
                shutil.rmtree(work, ignore_errors=True)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


LABELS = {"msknode": "msknode, fast transport", "msknode-stock": "msknode, stock pynetdicom"}


def format_report(result: BenchResult) -> str:
    s = result.summary()
    lines = [
        f"{'receiver':14s} {'associations':>12s} {'instances/s':>12s} {'MB/s':>8s} {'seconds':>8s}",
    ]
    for r in result.runs:
        lines.append(f"{r.receiver:14s} {r.associations:>12d} {r.ips:>12.1f} {r.mbps:>8.1f} {r.seconds:>8.2f}")

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    def ratio(a: float, b: float) -> str:
        return fmt(a / b if a and b else None)

    repeated = len(result.runs) > len(MODES) * len({r.receiver for r in result.runs})
    o1, o4 = result.ips("orthanc", "single"), result.ips("orthanc", "parallel")
    lines += [
        "",
        "medians over the repeated runs:" if repeated else "instances/s:",
        f"{'receiver':27s} {'1 association':>14s} {'/Orthanc':>9s} {'4 associations':>15s} {'/Orthanc':>9s}",
    ]
    for receiver in dict.fromkeys(r.receiver for r in result.runs):
        i1, i4 = result.ips(receiver, "single"), result.ips(receiver, "parallel")
        lines.append(
            f"{LABELS.get(receiver, receiver):27s} {i1:>14.1f} {ratio(i1, o1):>9s} {i4:>15.1f} {ratio(i4, o4):>9s}"
        )
    lines += [
        "",
        "CPU time of the receiver's processes over the send, ms per instance" + (" (medians):" if repeated else ":"),
        f"{'receiver':27s} {'1 association':>14s} {'4 associations':>15s}",
    ]
    for receiver in dict.fromkeys(r.receiver for r in result.runs):
        c1, c4 = result.cpu_ms(receiver, "single"), result.cpu_ms(receiver, "parallel")
        lines.append(f"{LABELS.get(receiver, receiver):27s} {fmt(c1):>14s} {fmt(c4):>15s}")
    lines.append("")
    if s["ratio_fast_stock"] is not None or s["ratio_fast_stock_parallel"] is not None:
        lines.append(
            f"fast transport / stock pynetdicom: {fmt(s['ratio_fast_stock'])} (1 association), "
            f"{fmt(s['ratio_fast_stock_parallel'])} (4 associations)"
        )
    lines += [
        f"msknode/storescp: {fmt(s['ratio_storescp'])} (1 association), {fmt(s['ratio_storescp_parallel'])} (4 associations)",
        f"all {result.instances} instances durable in msknode's store and index (every msknode run): {s['all_arrived']}",
        f"(msknode with {result.listener_processes} listener process(es); load average "
        f"{' '.join(str(x) for x in s['load_average_start'])} at the start, "
        f"{' '.join(str(x) for x in s['load_average'])} at the end)",
    ]
    return "\n".join(lines)

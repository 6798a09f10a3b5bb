"""``msknode demo``: a PACS that auto-routes to msknode, four phantom studies, their results back in the PACS.

1. Resets the demo data dir (``./demo-data`` by default; the phantom cache is kept), takes a
   lock on it, picks the ports (fixed defaults, or free ones).
2. Writes the four phantom studies (`node.demo.cases.DEMO_CASES`), unless cached.
3. Starts Orthanc with the ``docker/orthanc-autoroute.lua`` rule and ``msknode serve`` on the
   embedded default (SQLite, server-less broker), results going back to that Orthanc; creates
   the demo admin user.
4. Sends each study into Orthanc with ``storescu`` (as a modality would); Orthanc forwards each
   new MR instance to msknode as it is stored.
5. Waits until each study's results are acknowledged by Orthanc, then checks them in Orthanc
   (every object there, the kinds the shipped models must produce, dciodvfy on the copy the PACS
   returns), the worklist order through the web API, and that no result came back to msknode.
   Anything missing, failed or invalid: says which and exits 1 at once.
6. Prints a table (study, findings, priority, seconds from PACS to results), the worklist URL and
   login; keeps everything running until Ctrl-C (or stops at once with ``once``) and exits 0.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from node.demo.cases import DEMO_CASES, CaseFiles, DemoCase, Expectation, expectations, generate_case, shipped_models
from node.demo.stack import NodeStack, choose_ports
from node.demo.verify import NodeReader, NodeView, check_in_pacs, pacs_to_results_seconds
from node.errors import EndToEndError
from node.settings import Settings

MARKER = ".msknode-demo"
RESET_DIRS = ("orthanc", "node")
POLL_SECONDS = 0.5


@dataclass
class DemoOptions:
    data_dir: Path = Path("demo-data")
    once: bool = False
    free_ports: bool = False
    timeout: float = 900.0
    cases: tuple[DemoCase, ...] = DEMO_CASES
    validate: bool = True


@dataclass
class StudyOutcome:
    case: DemoCase
    files: CaseFiles
    expectation: Expectation
    view: NodeView | None = None
    seconds: float | None = None
    validated: int = 0
    problems: list[str] = field(default_factory=list)
    done: bool = False

    def findings_text(self) -> str:
        return summarize_findings(self.view.findings if self.view else [])

    def results_text(self) -> str:
        if self.view is None:
            return "-"
        c = self.view.counts()
        parts = []
        for kind, name in (("sr", "SR"), ("seg", "SEG"), ("sc", "SC"), ("superres", "SuperRes")):
            n = c.get(kind, 0)
            if n:
                parts.append(name if n == 1 else f"{name}x{n}")
        return " ".join(parts) or "-"


def summarize_findings(findings: list[dict]) -> str:
    """One short line: positive findings with probabilities, models that did not evaluate, or no finding."""
    pos, refused, evaluated = [], [], 0
    for f in findings:
        if f["code"] == "superres":
            continue
        if not f["evaluated"]:
            refused.append(f"{f['model']} not evaluated ({f['qc_reason'] or 'qc'})")
            continue
        evaluated += 1
        if f["positive"]:
            text = f["label"]
            if f.get("level") and f["level"] not in text:
                text += f" {f['level']}"
            if f["probability"] is not None:
                text += f" p={f['probability']:.2f}"
            pos.append(text)
    parts = pos or (["no finding"] if evaluated else [])
    return "; ".join(parts + refused) or "no model output"


class DemoFailed(EndToEndError):
    pass


# ---- data dir ---------------------------------------------------------------------------------


class DataDir:
    """The demo data dir: a marker says it is one (never wipe anything else), a lock keeps one demo at a time."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self._lock_fh: TextIO | None = None

    def claim(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise EndToEndError(f"{root} exists and is not a directory")
        if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
            raise EndToEndError(
                f"{root} is not empty and is not a demo data directory ({MARKER} missing); "
                "choose another with --data-dir"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text("msknode demo data directory: reset at every `msknode demo` run\n")
        self._lock_fh = open(root / ".lock", "w")  # noqa: SIM115 - held open: the lock lives as long as the file
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise EndToEndError(f"another msknode demo is running on {root}; stop it first (Ctrl-C)") from None

    def reset(self) -> None:
        for name in RESET_DIRS:
            shutil.rmtree(self.root / name, ignore_errors=True)
        for log in self.root.glob("*.log"):
            log.unlink()
        (self.root / "demo-summary.json").unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


# ---- the web worklist -------------------------------------------------------------------------


def worklist_order(web_url: str, username: str, password: str) -> list[dict]:
    """The worklist entries in reading order, through the web API with the demo login."""
    r = httpx.post(f"{web_url}/api/auth/token", json={"username": username, "password": password}, timeout=30)
    if r.status_code != 200:
        raise DemoFailed(f"the demo login was refused by the web API ({r.status_code}: {r.text[:200]})")
    token = r.json()["access_token"]
    r = httpx.get(f"{web_url}/api/worklist", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if r.status_code != 200:
        raise DemoFailed(f"the worklist API answered {r.status_code}: {r.text[:200]}")
    return r.json()["entries"]


def check_order(entries: list[dict], outcomes: list[StudyOutcome]) -> list[str]:
    """URGENT studies must be read before the normal one(s)."""
    position = {e["study_uid"]: i for i, e in enumerate(entries)}
    problems = []
    for o in outcomes:
        if o.files.study_uid not in position:
            problems.append(f"{o.case.key}: not on the worklist")
    urgent = [o for o in outcomes if o.expectation.priority == "URGENT"]
    normal = [o for o in outcomes if o.case.positive_model is None]
    for u in urgent:
        for n in normal:
            pu, pn = position.get(u.files.study_uid), position.get(n.files.study_uid)
            if pu is not None and pn is not None and pu > pn:
                problems.append(f"worklist order: {u.case.key} (URGENT) is below {n.case.key}")
    return problems


# ---- output -----------------------------------------------------------------------------------


def format_table(outcomes: list[StudyOutcome]) -> str:
    head = ("study", "findings", "priority", "results in PACS", "PACS->results")
    rows = []
    for o in outcomes:
        secs = f"{o.seconds:.1f} s" if o.seconds is not None else "-"
        prio = (o.view.priority if o.view else None) or "-"
        if o.view is not None and o.view.needs_review:
            prio += " (review)"
        rows.append((o.case.title, o.findings_text(), prio, o.results_text(), secs))
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    widths[1] = min(widths[1], 70)

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            c = c if len(c) <= widths[i] else c[: widths[i] - 3] + "..."
            out.append(c.rjust(widths[i]) if i == len(cells) - 1 else c.ljust(widths[i]))
        return "  ".join(out)

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_summary(path: Path, outcomes: list[StudyOutcome], *, stack: NodeStack, ok: bool, problems: list[str]) -> None:
    data = {
        "ok": ok,
        "problems": problems,
        "worklist_url": f"{stack.web_url}/worklist",
        "login": {"username": stack.username},
        "orthanc_url": stack.pacs.url,
        "ports": stack.ports.__dict__,
        "studies": [
            {
                "case": o.case.key,
                "title": o.case.title,
                "study_uid": o.files.study_uid,
                "expected": {
                    "min_counts": o.expectation.min_counts,
                    "absent": list(o.expectation.absent),
                    "priority": o.expectation.priority,
                    "notes": list(o.expectation.notes),
                },
                "priority": o.view.priority if o.view else None,
                "findings": o.view.findings if o.view else [],
                "results": [
                    {"kind": r.kind, "sop_instance_uid": r.sop_instance_uid, "series_uid": r.series_uid}
                    for r in (o.view.results if o.view else [])
                ],
                "pacs_to_results_s": o.seconds,
                "dciodvfy_checked": o.validated,
                "problems": o.problems,
            }
            for o in outcomes
        ],
    }
    path.write_text(json.dumps(data, indent=2))


# ---- the demo ---------------------------------------------------------------------------------


def run_demo(settings: Settings, options: DemoOptions, *, say: Callable[[str], None] = print) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    data = DataDir(options.data_dir)
    data.claim()
    stack: NodeStack | None = None
    try:
        data.reset()
        ports, notes = choose_ports(free=options.free_ports)
        for n in notes:
            say(f"note: {n}")
        shipped = shipped_models(settings.weights_dir)
        say("models with shipped weights: " + (", ".join(sorted(shipped)) or "none"))
        outcomes: list[StudyOutcome] = []
        for case in options.cases:
            t0 = time.monotonic()
            files = generate_case(case, data.root / "phantoms")
            exp = expectations(case, shipped)
            outcomes.append(StudyOutcome(case, files, exp))
            say(
                f"phantom study {case.key}: {len(files.files)} instances ({case.describe_labels()}) "
                f"[{time.monotonic() - t0:.1f} s]"
            )
            for note in exp.notes:
                say(f"  {note}")
        password = secrets.token_urlsafe(12)
        stack = NodeStack(data.root, ports=ports, base_settings=settings, password=password)
        say(f"starting Orthanc (PACS) and msknode serve under {data.root} ...")
        say(
            "models: this demo's configuration activates the shipped models (MSKNODE_ACTIVATE_MODELS="
            f"{','.join(stack.settings.activate_models)}); at a site they start in shadow (docs/models.md)"
        )
        stack.start()
        say(
            f"PACS: Orthanc {stack.pacs.aet}@127.0.0.1:{ports.orthanc_dicom}, web {stack.pacs.url} "
            f"| msknode: {stack.settings.ae_title}@127.0.0.1:{ports.node_dicom}, web {stack.web_url}"
        )
        for o in outcomes:
            stack.pacs.store_files(o.files.files)
            say(f"sent {o.case.key} to the PACS ({len(o.files.files)} instances)")
        problems = wait_for_results(stack, outcomes, options, say=say)
        if not problems:
            problems += check_order(worklist_order(stack.web_url, stack.username, password), outcomes)
            reader = NodeReader(stack.settings.data_dir / "msknode.db")
            try:
                loops = reader.own_objects_received()
            finally:
                reader.dispose()
            if loops:
                problems.append(f"{loops} series msknode created came back to it from the PACS (routing loop)")
        say("")
        say(format_table(outcomes))
        say("")
        write_summary(data.root / "demo-summary.json", outcomes, stack=stack, ok=not problems, problems=problems)
        if problems:
            for p in problems:
                say(f"FAILED: {p}")
            say(f"logs: {stack.node_log}, {stack.pacs.log_path}")
            return 1
        checked = sum(o.validated for o in outcomes)
        say(
            f"all results are in the PACS; {checked} objects passed dciodvfy with no error"
            if options.validate
            else "all results are in the PACS"
        )
        say(f"worklist: {stack.web_url}/worklist   login: {stack.username} / {password}")
        say(f"PACS (Orthanc Explorer): {stack.pacs.url}/app/explorer.html   login: {stack.username} / {password}")
        if options.once:
            say("DEMO_ONCE: stopping")
            return 0
        say("services keep running; press Ctrl-C to stop")
        wait_for_interrupt(stack)
        say("stopping")
        return 0
    except KeyboardInterrupt:
        say("interrupted: stopping")
        return 130
    except EndToEndError as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        if stack is not None:
            stack.stop()
        data.release()


def wait_for_results(
    stack: NodeStack, outcomes: list[StudyOutcome], options: DemoOptions, *, say: Callable[[str], None]
) -> list[str]:
    """Polls the node until every study is delivered (then checks it in the PACS); the first problem ends it."""
    reader = NodeReader(stack.settings.data_dir / "msknode.db")
    deadline = time.monotonic() + options.timeout
    try:
        while True:
            stack.check_running()
            pending = [o for o in outcomes if not o.done]
            if not pending:
                return []
            for o in pending:
                view = reader.view(o.files.study_uid)
                o.view = view
                why = view.failed
                if why:
                    o.problems.append(why)
                    return [f"{o.case.key}: {why}"]
                if not view.delivered:
                    continue
                check = check_in_pacs(view, o.expectation, stack.pacs, validate=options.validate, scratch=stack.root)
                o.validated = check.validated
                o.seconds = pacs_to_results_seconds(
                    stack.pacs.receptions(), o.files.sop_instance_uids, [r.sop_instance_uid for r in view.results]
                )
                o.done = True
                if check.problems:
                    o.problems += check.problems
                    return [f"{o.case.key}: {p}" for p in check.problems]
                secs = f"{o.seconds:.1f} s after its last image reached the PACS" if o.seconds is not None else ""
                say(f"{o.case.key}: {len(view.results)} result objects in the PACS {secs}")
            if time.monotonic() > deadline:
                return [
                    f"{o.case.key}: no complete results after {options.timeout:.0f} s ({describe_progress(o.view)})"
                    for o in outcomes
                    if not o.done
                ]
            time.sleep(POLL_SECONDS)
    finally:
        reader.dispose()


def describe_progress(view: NodeView | None) -> str:
    if view is None or view.received_instances == 0:
        return "nothing received by msknode"
    if view.job_id is None:
        return f"{view.received_instances} instances received, no job yet"
    states = sorted({s for r in view.results for s in r.outbox_states})
    text = f"job {view.job_id} {view.job_state}, {len(view.results)} result objects, outbox {','.join(states) or '-'}"
    if view.job_error:
        text += f"; attempt {view.attempts} failed: {view.job_error}"
    return text


def wait_for_interrupt(stack: NodeStack) -> None:
    """Until Ctrl-C or SIGTERM; raises EndToEndError if a service stops on its own."""
    stopping = {"flag": False}

    def _term(signum, frame):
        stopping["flag"] = True

    old = signal.signal(signal.SIGTERM, _term)
    try:
        while not stopping["flag"]:
            stack.check_running()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)


def options_from_env(
    args_once: bool, args_free_ports: bool, data_dir: str | None, timeout: float | None
) -> DemoOptions:
    """Command-line flags, with DEMO_ONCE, DEMO_DATA_DIR, DEMO_FREE_PORTS and DEMO_TIMEOUT from the environment."""

    def flag(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")

    opts = DemoOptions()
    opts.once = args_once or flag("DEMO_ONCE")
    opts.free_ports = args_free_ports or flag("DEMO_FREE_PORTS")
    opts.data_dir = Path(data_dir or os.environ.get("DEMO_DATA_DIR") or "demo-data")
    t = timeout if timeout is not None else os.environ.get("DEMO_TIMEOUT")
    if t is not None:
        try:
            opts.timeout = float(t)
        except ValueError:
            raise EndToEndError(f"DEMO_TIMEOUT must be a number of seconds, got {t!r}") from None
        if opts.timeout <= 0:
            raise EndToEndError("the demo timeout must be positive")
    return opts

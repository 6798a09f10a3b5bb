"""Logging: the libraries at WARNING, one INFO line per study and stage, JSON lines, msknode serve's log file."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import stat
import sys
import threading
import time

import pytest

from node.ops import logs
from node.ops.logs import LIBRARY_LOGGERS, LogFile, log_file_path, setup_logging
from node.ops.service import Child, Supervisor

pytestmark = pytest.mark.unit

STUDY = "1.2.826.0.1.3680043.8.498.84028505936500319211049173567070544355"
SERIES = "1.2.826.0.1.3680043.8.498.20645464852195631047491604344921026120"


@pytest.fixture
def restore_logging():
    """Puts back what setup_logging changes in this (the test) process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in LIBRARY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


def _configure(level="INFO", fmt="text", library_level=None, this_thread_only=True) -> io.StringIO:
    """setup_logging into a string; by default only this thread's records reach it (a thread another test
    left behind in this process — a listener's association, a web app's health probe — logs too)."""
    out = io.StringIO()
    setup_logging(level, fmt, library_level, stream=out)
    if this_thread_only:
        me = threading.get_ident()
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_msknode", False):  # the one setup_logging installed (not pytest's)
                handler.addFilter(lambda record: record.thread == me)
    return out


def _one_study():
    """The lines one knee study produces (a demo run), at the levels their modules log them (`DETAIL`)."""
    logging.getLogger("node.receive.listener").info(
        "association %s from %s (%s:%s) accepted", 2, "ORTHANC", "127.0.0.1", 49118
    )
    for uid in (SERIES, SERIES + "1", SERIES + "2"):
        logging.getLogger("node.intake.completeness").debug(
            "series %s routing: %s", uid, "plane sagittal -> knee/sag_fluid"
        )
        logging.getLogger("node.intake.completeness").debug(
            "series %s complete (%s, %d instances): %s", uid, "count", 34, "knee"
        )
    logging.getLogger("node.receive.listener").info("association %s released", 2)
    logging.getLogger("node.intake.completeness").info(
        "job %d created for study %s %s: %s", 1, STUDY, "knee", f"{SERIES}=sag_fluid"
    )
    logging.getLogger("node.jobs.worker").debug("jobs created: %s", [1])
    logging.getLogger("node.jobs.worker").debug("enqueued jobs %s", [1])
    logging.getLogger("node.jobs.runner").info("job %s: attempt %s of %s started by %s", 1, 1, 3, "vm:1")
    for k in range(120):
        logging.getLogger("highdicom.base").info("copy attributes of module %s", k)
    logging.getLogger("worklists.entries").info("worklist entry %s created for job %s: %s", 1, 1, "URGENT")
    logging.getLogger("node.jobs.runner").info("job %s: done in %.2f s (attempt %s)", 1, 2.44, 1)
    for k in range(70):
        logging.getLogger("node.dispatch.outbox").debug("sent %s to %s", f"1.2.826.0.1.3680043.10.1447.{k}", "ORTHANC")
    logging.getLogger("node.dispatch.outbox").info(
        "study %s: results of job %d sent to %s (%d objects)", STUDY, 1, "ORTHANC", 70
    )


def test_libraries_log_warnings_only_and_a_study_is_a_few_info_lines(restore_logging):
    out = _configure()
    _one_study()
    logging.getLogger("pynetdicom.acse").warning("a library's warning")
    lines = out.getvalue().splitlines()
    assert not [x for x in lines if "highdicom" in x or "sent 1.2" in x or "routing:" in x]
    assert "a library's warning" in lines[-1]
    info = [x for x in lines if " INFO " in x]
    # received (association), settled and routed (the job with its series), started, worklist, done, sent
    assert len(info) == 7, "\n".join(info)


def test_the_library_level_and_debug_bring_the_detail_back(restore_logging):
    out = _configure("DEBUG", library_level="INFO")
    _one_study()
    text = out.getvalue()
    assert text.count("highdicom.base: copy attributes") == 120
    assert text.count("DEBUG") >= 70 + 6 + 2  # the per-object and per-series lines, as DEBUG
    assert " INFO " not in "".join(x for x in text.splitlines() if "sent 1.2" in x)


DETAIL = {
    "node.intake.completeness": ("series %s routing: %s", "series %s complete (%s, %d instances): %s"),
    "node.jobs.worker": ("jobs created: %s", "enqueued jobs %s"),
    "node.dispatch.outbox": ("sent %s to %s",),
}


@pytest.mark.parametrize("logger", sorted(DETAIL))
def test_the_stages_log_their_per_series_and_per_object_lines_at_debug(logger):
    source = open(importlib.util.find_spec(logger).origin, encoding="utf-8").read()  # noqa: SIM115
    for template in DETAIL[logger]:
        assert f"log.debug({json.dumps(template)}" in source, f"{logger} does not log {template!r} at DEBUG"
        assert f"log.info({json.dumps(template)}" not in source


def test_json_lines_carry_time_level_logger_message_and_uids_only(restore_logging):
    out = _configure(fmt="json")
    logging.getLogger("node.intake.completeness").info("job %d created for study %s %s: %s", 7, STUDY, "knee", "x")
    logging.getLogger("node.intake.completeness").warning("series %s: pixel anatomy classifier not available", SERIES)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("node.jobs.runner").exception("job %s failed", 7)
    objs = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(objs) == 3
    first, second, third = objs
    assert set(first) == {"time", "level", "logger", "message", "process", "study_uid", "job_id"}
    assert (first["level"], first["logger"], first["study_uid"], first["job_id"]) == (
        "INFO",
        "node.intake.completeness",
        STUDY,
        7,
    )
    assert first["time"].endswith("+00:00")
    assert second["series_uid"] == SERIES and second["level"] == "WARNING"
    assert "ValueError: boom" in third["exception"]


def test_cli_log_format_option(restore_logging, monkeypatch, capsys, settings):
    from node.cli import build_parser, main

    monkeypatch.delenv("MSKNODE_LOG_FORMAT", raising=False)
    assert build_parser().parse_args(["--log-format", "json", "series"]).log_format == "json"
    assert main(["--log-format", "json", "series", "--json"]) == 0
    import os

    assert os.environ["MSKNODE_LOG_FORMAT"] == "json"
    monkeypatch.delenv("MSKNODE_LOG_FORMAT")
    logging.getLogger("node.test").warning("study %s", STUDY)
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["study_uid"] == STUDY


def test_log_file_is_private_and_rotated(tmp_path, settings):
    assert log_file_path(settings) == settings.data_dir / "logs" / "msknode.log"
    lf = LogFile(tmp_path / "logs" / "msknode.log", max_mb=0.001, backups=2)
    try:
        for k in range(100):
            lf.line(f"line {k} " + "x" * 40 + "\n", source="msknode.worker")
    finally:
        lf.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["msknode.log", "msknode.log.1", "msknode.log.2"]  # capped: two backups
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
    for name in files:
        assert stat.S_IMODE((tmp_path / "logs" / name).stat().st_mode) == 0o600
        assert (tmp_path / "logs" / name).stat().st_size <= 1100
    assert "line 99 " in (tmp_path / "logs" / "msknode.log").read_text()


def test_serve_writes_every_parts_lines_to_the_log_file_as_json(tmp_path, restore_logging, capsys):
    _configure(fmt="json")
    lf = LogFile(tmp_path / "logs" / "msknode.log", max_mb=1, backups=1, fmt="json")
    lf.attach()
    code = (
        "import logging, sys; from node.ops.logs import setup_logging; setup_logging('INFO'); "
        f"logging.getLogger('node.intake.completeness').info('job 3 created for study {STUDY} knee: x'); "
        "print('a banner line, not a log record'); sys.stdout.flush(); import time; time.sleep(30)"
    )
    sup = Supervisor([Child("worker", [sys.executable, "-c", code])], log_file=lf)
    t = threading.Thread(target=sup.run)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "banner" not in lf.path.read_text():
            time.sleep(0.1)
    finally:
        sup.stopping.set()
        t.join(30)
        lf.close()
    objs = [json.loads(x) for x in lf.path.read_text().splitlines()]  # every line one JSON object
    by_message = {o["message"]: o for o in objs}
    assert by_message[f"job 3 created for study {STUDY} knee: x"]["study_uid"] == STUDY
    assert by_message["a banner line, not a log record"]["logger"] == "msknode.worker"
    assert any(o["message"].startswith("started worker") for o in objs)  # the supervisor's own lines
    assert "a banner line" in capsys.readouterr().err  # still on stderr (console, journald)
    assert logs.FORMATS == ("text", "json")


def test_a_listener_quiets_only_pynetdicoms_wire_loggers(restore_logging):
    """Once a listener ran in this process, pynetdicom's lines about bytes on the wire drop to DEBUG (the
    transport logs one line per bad peer), while its other warnings — a rejected association — still show."""
    from node.receive.transport import PROTOCOL_LOGGERS, quiet_pynetdicom

    quiet_pynetdicom()
    out = _configure()
    logging.getLogger("pynetdicom.dul").error("Exception in DUL.run(), aborting association")
    logging.getLogger("pynetdicom.utils").error("Unable to decode with ascii")
    logging.getLogger("pynetdicom.acse").warning("Association Rejected")
    text = out.getvalue()
    assert "Association Rejected" in text
    assert "DUL.run" not in text and "Unable to decode" not in text
    assert "pynetdicom.acse" not in PROTOCOL_LOGGERS

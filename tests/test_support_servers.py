"""The check that no server outlives the test run (tests/support/servers.py, the session-end hook)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support import servers
from support.env import TESTS

pytestmark = pytest.mark.unit


def _wait_dead(proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _pytest_in(folder: Path) -> subprocess.CompletedProcess[str]:
    """A pytest run of the tests in ``folder`` (its own session, so its own leak check)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(folder / "bt"), str(folder)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_leaked_child_is_found_by_pid_and_command():
    before = {leak.pid for leak in servers.leaked_processes()}
    proc = subprocess.Popen(["sleep", "300"])
    try:
        leaks = [leak for leak in servers.leaked_processes() if leak.pid not in before]
        assert [(leak.pid, leak.cmdline) for leak in leaks] == [(proc.pid, "sleep 300")]
        assert "child of pytest" in str(leaks[0]) and str(proc.pid) in str(leaks[0])
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in {leak.pid for leak in servers.leaked_processes()}  # gone once it is stopped (and reaped)


def test_a_detached_process_is_found_by_the_run_marker():
    """A daemon that left the process tree (as pg_ctl's postmaster does) still carries the run's marker."""
    marker = servers.mark_run()
    # the shell starts sleep in the background and exits: sleep's parent is then init, not pytest
    out = subprocess.run(
        ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    )
    pid = int(out.stdout.strip())
    try:
        assert pid not in servers.descendants()
        leaks = {leak.pid: leak for leak in servers.leaked_processes(marker=marker)}
        assert pid in leaks and leaks[pid].why == "started by this test run"
        assert pid not in {leak.pid for leak in servers.leaked_processes(marker="another-run")}
    finally:
        servers.kill_leaks([servers.Leak(pid, "sleep 300", "test")])
    deadline = time.monotonic() + 10
    while pid in {leak.pid for leak in servers.leaked_processes(marker=marker)} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in {leak.pid for leak in servers.leaked_processes(marker=marker)}


def test_a_cluster_directory_with_a_live_postmaster_is_a_leak(tmp_path):
    postmaster = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        live = tmp_path / f"{servers.PG_PREFIX}{os.getpid()}-abc" / "data"
        live.mkdir(parents=True)
        (live / "postmaster.pid").write_text(f"{postmaster.pid}\n/tmp/x\n")
        dead = tmp_path / f"{servers.PG_PREFIX}{os.getpid()}-def" / "data"
        dead.mkdir(parents=True)
        (dead / "postmaster.pid").write_text("999999999\n")
        other_run = tmp_path / f"{servers.PG_PREFIX}1-ghi" / "data"  # another pytest's cluster is not ours
        other_run.mkdir(parents=True)
        (other_run / "postmaster.pid").write_text(f"{postmaster.pid}\n")
        assert servers.pg_clusters(tmp=tmp_path) == [(live.parent, postmaster.pid), (dead.parent, None)]
        [leak] = [leak for leak in servers.leaked_processes(tmp=tmp_path) if leak.pid == postmaster.pid]
        assert leak.why == f"postmaster of {live.parent}" and leak.cmdline == "sleep 300"
    finally:
        postmaster.kill()
        postmaster.wait()


def test_stop_all_stops_what_is_still_registered(monkeypatch):
    # a registry of this test's own: the session's servers (PostgreSQL, Orthanc, ...) stay registered and running
    monkeypatch.setattr(servers, "_live", {})
    proc = subprocess.Popen(["sleep", "300"])
    token = servers.track("sleeper", lambda: (proc.kill(), proc.wait()))
    try:
        assert "sleeper" in servers.tracked()
        assert "sleeper" in servers.stop_all()
        assert _wait_dead(proc, 5)
        assert "sleeper" not in servers.tracked()
    finally:
        servers.untrack(token)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_run_that_leaks_a_process_fails_and_names_it(tmp_path):
    """pytest in a subprocess with this suite's session-end hook: a passing test that leaves ``sleep``
    running makes the run fail, the message names the process, and the process is killed."""
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(TESTS)!r})
        spec = importlib.util.spec_from_file_location("suite_conftest", {str(TESTS / "conftest.py")!r})
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        pytest_sessionfinish = suite.pytest_sessionfinish
    """)
    )
    (tmp_path / "test_leaky.py").write_text(
        textwrap.dedent("""
        import subprocess

        def test_leaks(tmp_path):
            proc = subprocess.Popen(["sleep", "313"])
            (tmp_path.parent.parent / "leaked.pid").write_text(str(proc.pid))

        def test_clean():
            subprocess.run(["true"], check=True)
    """)
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    run = _pytest_in(tmp_path)
    pid = int((tmp_path / "leaked.pid").read_text())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    assert (
        "the test run left servers running" in run.stdout and f"pid {pid}" in run.stdout and "sleep 313" in run.stdout
    )
    deadline = time.monotonic() + 10
    while servers._proc_stat(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers._proc_stat(pid) is None  # killed by the hook (and reaped by init)

    (tmp_path / "test_leaky.py").write_text("def test_clean():\n    pass\n")
    clean = _pytest_in(tmp_path)
    assert clean.returncode == 0 and "left servers running" not in clean.stdout, clean.stdout

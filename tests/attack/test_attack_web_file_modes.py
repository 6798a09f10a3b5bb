"""What the node writes is readable by its own user alone, and what it keeps of refused objects and
connections does not stay forever.

Before: the SQLite database with its WAL and shm files, the quarantine's files and every folder were
world-readable (0644/0755; images alone were 0640), and quarantined objects and association rows were
never deleted. A real ``msknode listen`` receives a series and a broken object from dcmtk storescu;
then ``msknode purge`` runs with the retention settings.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select, update

from support.env import VENV_BIN, isolate_env
from support.jobs import storescu, wait_for, write_phantom_series
from support.listener import ListenerProcess

pytestmark = [pytest.mark.integration]


def _modes(root: Path) -> dict[Path, int]:
    out = {root: stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[p] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.fixture
def received(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # a data dir made before, world-readable
    os.chmod(data, 0o755)
    series = write_phantom_series(tmp_path / "series", seed=3, slices=6, matrix=32)
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(series[0])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # contradicts Rows x Columns: refused, quarantined
    ds.save_as(broken)
    lp = ListenerProcess(data, env={"MSKNODE_LISTENER_PROCESSES": "1"}).start()
    try:
        proc = storescu(lp.port, [*series, broken])
        proc.communicate(timeout=60)
        isolate_env(monkeypatch, MSKNODE_DATA_DIR=data, MSKNODE_PORT=lp.port)
        from node.db.database import Database
        from node.db.schema import Association, Instance, Quarantine
        from node.settings import load_settings

        db = Database(load_settings().database_url, migrate=False)

        def done():
            with db.session() as s:
                inst = s.scalar(select(func.count()).select_from(Instance))
                quar = s.scalar(select(func.count()).select_from(Quarantine))
                ended = s.scalar(select(func.count()).select_from(Association).where(Association.ended_at.is_not(None)))
            return inst == len(series) and quar == 1 and ended >= 1

        wait_for(done, 30, what="the series stored, the broken object quarantined, the association ended")
        yield lp, data, db
        db.dispose()
    finally:
        lp.stop()


def test_nothing_the_node_writes_is_readable_by_others(received):
    _lp, data, _db = received
    modes = _modes(data)
    assert modes[data] == 0o700, oct(modes[data])
    for name in ("msknode.db", "msknode.db-wal", "msknode.db-shm"):
        assert (data / name).exists(), name
        assert modes[data / name] & 0o077 == 0, (name, oct(modes[data / name]))
    quarantined = [p for p in modes if "quarantine" in p.parts and p.is_file()]
    stored = [p for p in modes if "store" in p.parts and p.is_file()]
    assert quarantined and stored
    leaky = {str(p.relative_to(data)): oct(m) for p, m in modes.items() if p != data and m & 0o077}
    assert not leaky, leaky


def test_retention_deletes_old_quarantine_and_association_rows(received, tmp_path):
    _lp, data, db = received
    from node.db.schema import Association, Quarantine

    with db.session() as s:
        qpath = Path(s.scalar(select(Quarantine.path)))
        n_assoc = s.scalar(select(func.count()).select_from(Association))
    assert qpath.is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSKNODE_")}
    env.update(
        MSKNODE_DATA_DIR=str(data), MSKNODE_QUARANTINE_RETENTION_DAYS="7", MSKNODE_ASSOCIATION_RETENTION_DAYS="7"
    )

    def purge() -> str:
        r = subprocess.run(
            [str(VENV_BIN / "msknode"), "purge", "--json"], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    # young: kept
    assert '"quarantined": 0' in purge()
    assert qpath.is_file()
    # eight days old: the quarantine row and its file, and the ended associations, are deleted
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
    with db.session() as s:
        s.execute(update(Quarantine).values(received_at=old))
        s.execute(update(Association).where(Association.ended_at.is_not(None)).values(ended_at=old))
        s.add(Association(calling_ae="OPEN", called_ae="MSKNODE", started_at=old))  # still open: kept
    out = purge()
    assert '"quarantined": 1' in out and f'"associations": {n_assoc}' in out, out
    assert not qpath.exists()
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Quarantine)) == 0
        assert s.scalars(select(Association.calling_ae)).all() == ["OPEN"]

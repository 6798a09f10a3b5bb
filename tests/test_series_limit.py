"""MSKNODE_MAX_SERIES_VOXELS: a series larger than the node reads is never loaded; its models say why.

The unit tests count voxels from real phantom files; the end-to-end test sends a knee phantom study
through Orthanc into a real ``msknode serve`` whose limit is below the study's series and reads what
came back: every model "not evaluated" with ``series_too_large`` (findings, worklist, the SR in the
PACS, which passes dciodvfy), no super-resolved series.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from models.phantoms import write_study
from node.demo.cases import DemoCase, generate_case
from node.demo.stack import NodeStack, choose_ports
from node.demo.verify import NodeReader, dciodvfy
from node.jobs.limits import REASON, oversized, series_voxels
from node.jobs.runner import InputSeries
from node.settings import load_settings

pytestmark = [pytest.mark.unit]


@pytest.fixture(scope="module")
def knee_study(tmp_path_factory) -> dict[str, list[Path]]:
    return write_study("knee", tmp_path_factory.mktemp("knee"), 3, n_slices=12, matrix=128)


def _inputs(study: dict[str, list[Path]]) -> list[InputSeries]:
    out = []
    for role, paths in study.items():
        ds = dcmread(paths[0], stop_before_pixels=True)
        out.append(InputSeries(0, str(ds.SeriesInstanceUID), role, None, tuple(paths)))
    return out


def test_series_voxels_are_rows_times_columns_times_instances(knee_study):
    for paths in knee_study.values():
        ds = dcmread(paths[0], stop_before_pixels=True)
        assert series_voxels(paths) == int(ds.Rows) * int(ds.Columns) * len(paths) > 0


def test_only_loaded_roles_over_the_limit_are_refused(knee_study):
    inputs = _inputs(knee_study)
    sizes = {i.role: series_voxels(i.paths) for i in inputs}
    biggest = max(v for r, v in sizes.items() if r != "localizer")
    assert oversized(inputs, biggest) == {}
    refused = oversized(inputs, biggest - 1)
    assert set(refused) == {r for r, v in sizes.items() if r != "localizer" and v == biggest}
    for role, why in refused.items():
        assert "MSKNODE_MAX_SERIES_VOXELS" in why and str(sizes[role]) in why
    everything = oversized(inputs, 1024)
    assert "localizer" not in everything  # never model input, never loaded
    assert set(everything) == set(sizes) - {"localizer"}


@pytest.mark.integration
@pytest.mark.slow
def test_a_study_over_the_limit_is_reported_not_evaluated_series_too_large(tmp_path):
    case = DemoCase("knee-big", "knee", "knee", 3, {}, None, None, False)
    cf = generate_case(case, tmp_path / "phantoms", n_slices=12, matrix=128)
    limit = 100_000  # each knee series is 12 x 128 x 128 = 196608 voxels
    stack = NodeStack(
        tmp_path / "stack",
        ports=choose_ports(free=True)[0],
        base_settings=load_settings(),
        password=secrets.token_urlsafe(12),
        extra_env={"MSKNODE_MAX_SERIES_VOXELS": str(limit)},
    )
    stack.start()
    reader = NodeReader(stack.settings.data_dir / "msknode.db")
    try:
        stack.pacs.store_files(cf.files)
        deadline = time.monotonic() + 300
        view = reader.view(cf.study_uid)
        while not (view.delivered or view.failed) and time.monotonic() < deadline:
            stack.check_running()
            time.sleep(0.5)
            view = reader.view(cf.study_uid)
        assert view.delivered, view.failed or "no results within 300 s"
        models = [f for f in view.findings if f["code"] != "superres"]
        assert models and all(not f["evaluated"] and f["qc_reason"] == REASON for f in models), view.findings
        assert not [r for r in view.results if r.kind == "superres"]
        assert any("larger than this node reads" in r for r in view.reasons), view.reasons
        srs = [r for r in view.results if r.kind == "sr"]
        assert len(srs) == 1
        oid = stack.pacs.lookup(srs[0].sop_instance_uid, "Instance")
        assert oid is not None
        path = tmp_path / "sr.dcm"
        path.write_bytes(stack.pacs.instance_file(oid))
        errors, _ = dciodvfy(path)
        assert errors == []
        meanings = {str(item.CodeMeaning) for item in _codes(dcmread(path))}
        assert "Series too large" in meanings
    finally:
        reader.dispose()
        stack.stop()


def _codes(ds):
    for item in ds.get("ContentSequence", []):
        for seq in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
            yield from item.get(seq, [])
        yield from _codes(item)

"""`node.jobs.runner.save_all`: a job's result objects written with their fsyncs batched, byte for byte
what `node.results.save` writes one by one, nothing temporary left behind (also when writing fails)."""

from __future__ import annotations

import pytest

from node.jobs.runner import save_all
from node.results import build_results, result_path, save
from node.settings import Settings
from support.results_data import knee_output, volume_from_files, write_mr_series

pytestmark = [pytest.mark.unit]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("save-all")
    paths = write_mr_series(tmp / "src", n_slices=4)
    vol = volume_from_files(paths)
    return build_results(
        output=knee_output(vol),
        source_files={vol.series_uid: paths},
        triage=None,
        predecessors=[],
        settings=Settings(data_dir=tmp / "ref"),
        job_fingerprint="save-all-tests",
    )


def test_save_all_writes_what_save_writes(tmp_path, results):
    assert len(results) > 3 and len({r.series_uid for r in results}) > 1  # several files and directories
    one_by_one = Settings(data_dir=tmp_path / "one")
    batched = Settings(data_dir=tmp_path / "batch")
    expected = [save(r, one_by_one) for r in results]
    paths = save_all(results, batched)
    assert paths == [result_path(r, batched) for r in results]
    for p, e in zip(paths, expected):
        assert p.read_bytes() == e.read_bytes()
    assert not list(batched.results_dir.rglob(".tmp-*"))


def test_save_all_leaves_nothing_temporary_when_an_object_cannot_be_written(tmp_path, results):
    import copy

    broken = copy.deepcopy(results[-1])
    del broken.dataset.file_meta  # no transfer syntax: pydicom refuses to write it
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match="encoding to use for writing"):
        save_all([*results[:3], broken], settings)
    assert not [p for p in settings.results_dir.rglob("*") if p.is_file()]


def test_an_element_the_slices_of_a_series_share_is_encoded_once(tmp_path, results, monkeypatch):
    """The super-resolved slices share their common elements (`node.results.superres_series`): the batch
    writer encodes each of those once, and every file is still what pydicom writes (the test above)."""
    from node.results import encode

    derived = [r for r in results if r.kind == "superres"]
    assert len(derived) > 2
    encoded: list[int] = []
    real = encode.write_data_element

    def counting(fp, elem, encodings=None):
        encoded.append(int(elem.tag))
        return real(fp, elem, encodings)

    monkeypatch.setattr(encode, "write_data_element", counting)
    save_all(derived, Settings(data_dir=tmp_path / "data"))
    modality, pixels = 0x00080060, 0x7FE00010
    assert encoded.count(modality) == 1  # the same element in every slice
    assert encoded.count(pixels) == len(derived)  # each slice's own

"""The ``spider:PATH`` reader of ``lumbar_spine.discs``: IVD labels named as levels (SPIDER counts from the
sacrum: IVD 1 = L5-S1), disc centres found from the crops in the (vertically flipped) images, and the
patient-level split (no patient in two splits)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import parse_spec
from models.discs.spider import LEVEL_OF_IVD, load_spider, split_of
from models.errors import DataSpecError
from models.tasks.spine_discs import LEVELS
from support.spine_corpus import spider_root

pytestmark = [pytest.mark.unit]

GRADING_HEADER = [
    "Patient",
    "IVD label",
    "Modic",
    "UP endplate",
    "LOW endplate",
    "Spondylolisthesis",
    "Disc herniation",
    "Disc narrowing",
    "Disc bulging",
    "Pfirrman grade",
]


def _synthetic_folder(root: Path, n_discs: int = 6) -> dict[str, tuple[int, int]]:
    """One patient (id 3) with a 200 x 120 head-up image holding ``n_discs`` textured discs head to feet,
    stored flipped like SPIDER (sacrum at the top), one RGB crop per disc with a red border (numbered head
    to feet), gradings IVD 1..n (IVD 1 at the sacrum). Returns IVD label -> head-up (row, col) centre."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 40, (200, 120)).astype(np.uint8)
    centres: dict[int, tuple[int, int]] = {}
    for k in range(n_discs):  # k = 0 is the most cranial disc
        r, c = 20 + 30 * k, 50 + 3 * k
        img[r - 5 : r + 6, c - 18 : c + 19] = rng.integers(120, 255, (11, 37))
        centres[n_discs - k] = (r, c)  # IVD label counts from the sacrum
    (root / "midsagittal_images").mkdir(parents=True)
    (root / "disc_crops").mkdir()
    Image.fromarray(img[::-1]).save(root / "midsagittal_images" / "3_t2.png")
    for k in range(n_discs):
        r, c = 20 + 30 * k, 50 + 3 * k
        crop = np.stack([img[r - 10 : r + 11, c - 25 : c + 26]] * 3, axis=-1).copy()
        crop[:5], crop[-5:], crop[:, :5], crop[:, -5:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
        Image.fromarray(crop).save(root / "disc_crops" / f"3_t2_disc_{k + 1}.png")
    with open(root / "radiological_gradings.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(GRADING_HEADER)
        for ivd in range(1, n_discs + 1):
            grade = min(ivd, 5)
            w.writerow([3, ivd, 0, 0, 0, 0, int(ivd == 2), 0, 0, grade])
        w.writerow([3, 0, 0, 0, 0, 0, 0, 0, 0, 3])  # an IVD label 0 row: ignored
    with open(root / "overview.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["new_file_name", "PixelSpacing"])
        w.writerow(["3_t2", "[0.5, 0.625]"])
    return centres


def test_ivd_labels_name_levels_from_the_sacrum_and_crops_give_centres(tmp_path):
    truth = _synthetic_folder(tmp_path)
    (pt,) = load_spider(tmp_path, centres=True)
    assert LEVEL_OF_IVD[1] == "L5-S1" and LEVEL_OF_IVD[5] == "L1-L2"
    # IVD 1 = L5-S1 got grade 1, IVD 2 = L4-L5 grade 2 and the herniation, ... IVD 6 (T12-L1) is not lumbar
    assert {lv: d.pfirrmann for lv, d in pt.discs.items()} == {
        "L5-S1": 1,
        "L4-L5": 2,
        "L3-L4": 3,
        "L2-L3": 4,
        "L1-L2": 5,
    }
    assert [lv for lv, d in pt.discs.items() if d.herniation] == ["L4-L5"]
    assert pt.n_graded == 6
    (s,) = pt.series
    assert s.spacing == (0.5, 0.625)
    assert set(s.centres) == set(LEVELS)
    for ivd, level in LEVEL_OF_IVD.items():
        r, c = s.centres[level]
        assert abs(r - truth[ivd][0]) <= 0.5 and abs(c - truth[ivd][1]) <= 0.5, (level, s.centres[level], truth[ivd])
    # the canonical image is head-up: the L5-S1 centre is the most caudal (largest row)
    assert max(s.centres.values())[0] == s.centres["L5-S1"][0]
    canon = s.canonical()
    r, c = (round(v) for v in s.centres["L1-L2"])
    assert canon.image[r, c] > 0.3 > canon.image[r + 9, c]


def test_crops_that_do_not_match_the_gradings_name_no_discs(tmp_path):
    _synthetic_folder(tmp_path)
    (tmp_path / "disc_crops" / "3_t2_disc_6.png").unlink()  # 5 crops for 6 graded discs: cannot be named
    (pt,) = load_spider(tmp_path, centres=True)
    assert pt.series[0].centres == {}
    assert len(pt.discs) == 5


def test_bad_folders_are_refused_with_a_reason(tmp_path):
    with pytest.raises(DataSpecError, match="no such folder"):
        load_spider(tmp_path / "absent")
    with pytest.raises(DataSpecError, match="SPIDER layout"):
        load_spider(tmp_path)
    assert parse_spec(f"spider:{tmp_path}").kind == "spider"
    with pytest.raises(DataSpecError, match="missing PATH"):
        parse_spec("spider:")


def test_split_is_by_patient_and_deterministic():
    ids = [str(i) for i in range(1, 400)]
    splits = {i: split_of(i) for i in ids}
    assert splits == {i: split_of(i) for i in ids}
    share = {k: sum(v == k for v in splits.values()) / len(ids) for k in ("train", "val", "test")}
    assert 0.5 < share["train"] < 0.7 and 0.12 < share["val"] < 0.28 and 0.12 < share["test"] < 0.28


def test_real_corpus_patients_levels_and_split():
    root = spider_root()
    patients = load_spider(root)
    assert len(patients) == 175
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for p in patients:
        by_split[p.split].add(p.id)
        assert set(p.discs) == set(LEVELS)  # every patient has the five lumbar discs graded
        assert p.eval_series() is not None
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"])
    assert not by_split["val"] & by_split["test"]
    # patient 1: IVD 1 (L5-S1) Pfirrmann 3, IVD 4 (L2-L3) Pfirrmann 4 in radiological_gradings.csv
    p1 = next(p for p in patients if p.id == "1")
    assert p1.discs["L5-S1"].pfirrmann == 3 and p1.discs["L2-L3"].pfirrmann == 4

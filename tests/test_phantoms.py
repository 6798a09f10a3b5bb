"""Synthetic MR phantoms: labels, lesions, masks, reproducibility, no label leakage."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from scipy import ndimage

from models.phantoms import SPEC, PhantomError, generate
from models.phantoms.shortcut import global_features, shortcut_auc
from models.types import Volume

pytestmark = pytest.mark.unit

SMALL = dict(matrix=96)


def _dist_mm(vol: Volume, a, b) -> float:
    aff = vol.affine()
    pa = aff @ np.array([*a, 1.0])
    pb = aff @ np.array([*b, 1.0])
    return float(np.linalg.norm(pa[:3] - pb[:3]))


# ---------------------------------------------------------------- geometry and types


@pytest.mark.parametrize("anatomy", ["knee", "shoulder", "lumbar_spine"])
def test_volume_geometry_is_realistic(anatomy):
    p = generate(anatomy, 3)
    v = p.volume
    a = SPEC.for_anatomy(anatomy).acquisition
    assert v.array.dtype == np.float32 and v.array.ndim == 3
    nk, nj, ni = v.shape
    assert a.n_slices[0] <= nk <= a.n_slices[1]
    assert nj == ni == a.matrix
    assert a.slice_thickness_mm[0] <= v.attributes["slice_thickness"] <= a.slice_thickness_mm[1]
    assert v.spacing[0] >= v.attributes["slice_thickness"] - 1e-6  # spacing = thickness + gap
    assert a.fov_mm[0] / a.matrix <= v.spacing[1] <= a.fov_mm[1] / a.matrix
    # orthonormal cosines, slice positions advance along the normal by the spacing
    r, c = np.asarray(v.row_cosine), np.asarray(v.col_cosine)
    assert abs(np.dot(r, c)) < 1e-5 and abs(np.linalg.norm(r) - 1) < 1e-5 and abs(np.linalg.norm(c) - 1) < 1e-5
    steps = np.diff(v.positions, axis=0) @ v.normal
    assert np.allclose(steps, v.spacing[0], atol=1e-4)
    assert np.isfinite(v.array).all() and v.array.min() >= 0 and v.array.max() > 0
    for name, m in p.masks.items():
        assert m.shape == v.shape and m.dtype == bool, name
    assert p.masks["foreground"].mean() > 0.2


def test_orientations_match_the_prescription():
    sag = generate("knee", 1).volume
    assert abs(sag.normal[0]) > 0.95  # sagittal: slices along left-right
    assert abs(sag.col_cosine[2]) > 0.95  # rows run head-foot
    cor = generate("knee", 1, orientation="coronal").volume
    assert abs(cor.normal[1]) > 0.95
    sh = generate("shoulder", 1).volume
    n = sh.normal
    # coronal-oblique: slice normal in the axial plane, 15-55 degrees from pure coronal (A-P)
    ang = np.degrees(np.arccos(abs(n[1]) / np.linalg.norm(n[:2])))
    assert 15 < ang < 55 and abs(n[2]) < 0.15
    sp = generate("lumbar_spine", 1).volume
    assert abs(sp.normal[0]) > 0.95 and abs(sp.col_cosine[2]) > 0.95


def test_overrides_change_grid_and_quality():
    p = generate("knee", 2, n_slices=20, matrix=128, snr=None, motion_px=0.0, sequence="T1")
    assert p.volume.shape == (20, 128, 128)
    assert p.volume.attributes["sequence"] == "T1"
    big = generate("knee", 2, matrix=384, n_slices=4)
    assert big.volume.shape == (4, 384, 384)


# ---------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("anatomy", ["knee", "shoulder", "lumbar_spine"])
def test_same_seed_same_phantom(anatomy):
    a = generate(anatomy, 11, **SMALL)
    b = generate(anatomy, 11, **SMALL)
    c = generate(anatomy, 12, **SMALL)
    assert np.array_equal(a.volume.array, b.volume.array)
    assert a.labels == b.labels
    assert a.volume.series_uid == b.volume.series_uid
    assert a.volume.shape != c.volume.shape or not np.array_equal(a.volume.array, c.volume.array)


def test_forcing_a_label_changes_only_the_lesion_region():
    """Same seed, ACL intact vs complete: anatomy and every nuisance identical; the images
    differ only near the torn ligament (noise-free to compare the signal itself)."""
    kw = dict(snr=None, motion_px=0.0, meniscus_tear=False)
    intact = generate("knee", 21, acl="intact", **kw)
    torn = generate("knee", 21, acl="complete", **kw)
    assert intact.volume.shape == torn.volume.shape
    assert np.array_equal(intact.masks["femur"], torn.masks["femur"])
    diff = np.abs(torn.volume.array - intact.volume.array)
    changed = diff > 0.05 * float(np.percentile(intact.volume.array, 99))
    centre = torn.labels["lesion_centers_vox"]["acl"]
    idx = np.argwhere(changed)
    assert len(idx) > 0
    d = [_dist_mm(torn.volume, centre, tuple(x)) for x in idx[:: max(1, len(idx) // 400)]]
    assert max(d) < 30.0  # all visible change within 3 cm of the tear
    assert abs(torn.volume.array.mean() - intact.volume.array.mean()) < 0.003 * intact.volume.array.mean()


# ---------------------------------------------------------------- labels and lesions


def test_label_distribution_follows_the_spec():
    labs = [generate("knee", s, matrix=64, n_slices=8).labels for s in range(200, 300)]
    tears = [lb for lb in labs if lb["acl_tear"]]
    assert 0.35 < len(tears) / len(labs) < 0.65
    partial_share = np.mean([lb["acl"] == "partial" for lb in tears])
    assert partial_share >= 0.35  # spec: >= 40 % of tears partial (sampling noise allowed)
    assert 0.35 < np.mean([lb["meniscus_tear"] for lb in labs]) < 0.65
    assert all((lb["meniscus_side"] is None) == (not lb["meniscus_tear"]) for lb in labs)


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_complete_acl_tear_is_a_discontinuity(seed):
    p = generate("knee", seed, acl="complete", **SMALL)
    q = generate("knee", seed, acl="intact", **SMALL)
    lesion = p.masks["acl_lesion"]
    assert lesion.any() and not q.masks["acl_lesion"].any()
    # the intact ligament is one piece; the torn one falls apart into two stumps
    full = np.ones((3, 3, 3), bool)
    _, n_intact = ndimage.label(q.masks["acl"], structure=full)
    _, n_torn = ndimage.label(p.masks["acl"], structure=full)
    assert n_intact == 1
    assert n_torn >= 2
    # the gap holds fluid-like signal: brighter than the ligament it replaced
    arr = p.volume.array
    assert arr[lesion].mean() > 1.5 * arr[p.masks["acl"]].mean()


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_partial_acl_tear_keeps_fibres_in_continuity(seed):
    p = generate("knee", seed, acl="partial", **SMALL)
    lesion, acl = p.masks["acl_lesion"], p.masks["acl"]
    assert lesion.any()
    full = np.ones((3, 3, 3), bool)
    _, n = ndimage.label(acl | lesion, structure=full)
    assert n == 1
    # lesion borders residual ligament
    assert (ndimage.binary_dilation(lesion, structure=full) & acl).any()
    assert lesion.sum() < acl.sum()


@pytest.mark.parametrize("side", ["medial", "lateral"])
def test_meniscal_tear_reaches_an_articular_surface(side):
    for seed in range(50, 56):
        p = generate("knee", seed, meniscus_side=side, **SMALL)
        assert p.labels["meniscus_tear"] == 1 and p.labels["meniscus_side"] == side
        lesion = p.masks["meniscus_lesion"]
        assert lesion.any(), seed
        # the tear lies in the meniscus of that side (its centre is closer to that meniscus)
        c = p.labels["lesion_centers_vox"]["meniscus"]
        d_side = _dist_mm(p.volume, c, p.labels["structure_centers_vox"][f"meniscus_{side}"])
        other = "lateral" if side == "medial" else "medial"
        d_other = _dist_mm(p.volume, c, p.labels["structure_centers_vox"][f"meniscus_{other}"])
        assert d_side < d_other
        # reaches the surface: touches cartilage, joint fluid or bone, not only meniscus
        ring = ndimage.binary_dilation(lesion, iterations=1) & ~lesion
        outside = (
            p.masks["cartilage"] | p.masks["joint_fluid"] | p.masks["femur"] | p.masks["tibia"] | p.masks["soft_tissue"]
        )
        assert (ring & outside).any(), seed
    q = generate("knee", 50, meniscus_tear=False, **SMALL)
    assert not q.masks["meniscus_lesion"].any() and q.labels["meniscus_side"] is None


@pytest.mark.parametrize("cuff", ["partial", "full_thickness"])
def test_cuff_tear_lies_in_the_supraspinatus_tendon(cuff):
    for seed in range(60, 64):
        p = generate("shoulder", seed, cuff=cuff)
        lesion = p.masks["cuff_lesion"]
        assert lesion.any(), seed
        near = ndimage.binary_dilation(lesion, iterations=2)
        assert (near & p.masks["supraspinatus_tendon"]).any() or cuff == "full_thickness"
        assert (
            _dist_mm(
                p.volume, p.labels["lesion_centers_vox"]["cuff"], p.labels["structure_centers_vox"]["supraspinatus"]
            )
            < 30.0
        )
    none = generate("shoulder", 60, cuff="none", **SMALL)
    assert not none.masks["cuff_lesion"].any() and none.labels["lesion_centers_vox"] == {}


def test_full_thickness_tear_removes_more_tendon_than_partial():
    kw = dict(snr=None, **SMALL)
    sizes = {
        c: generate("shoulder", 70, cuff=c, **kw).masks["supraspinatus_tendon"].sum()
        for c in ("none", "partial", "full_thickness")
    }
    assert sizes["none"] > sizes["partial"] > sizes["full_thickness"]


def test_stenosis_grade_is_canal_narrowing():
    """Forcing L4-L5 from normal to severe narrows the dural sac there, monotonically, and
    leaves the other levels alone."""
    csf_near = []
    for g in ("normal", "mild", "moderate", "severe"):
        p = generate("lumbar_spine", 80, stenosis={"L4-L5": g, "L2-L3": "normal"}, snr=None)
        assert p.labels["stenosis"]["L4-L5"] == g
        _k, j, i = p.labels["level_centers_vox"]["L4-L5"]
        _k2, j2, i2 = p.labels["level_centers_vox"]["L2-L3"]
        canal = p.masks["canal"] | p.masks["cauda_equina"]
        csf_near.append(
            (canal[:, j - 4 : j + 5, i - 20 : i + 21].sum(), canal[:, j2 - 4 : j2 + 5, i2 - 20 : i2 + 21].sum())
        )
        assert p.masks["narrowing_L4-L5"].any() == (g != "normal")
    at, other = zip(*csf_near)
    assert all(a > b for a, b in itertools.pairwise(at)), at
    assert len(set(other)) == 1
    assert at[-1] < 0.5 * at[0]


def test_stenosis_labels_cover_every_level():
    p = generate("lumbar_spine", 5, **SMALL)
    levels = ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    assert list(p.labels["stenosis"]) == levels
    vox = p.labels["level_centers_vox"]
    rows = [vox[lv][1] for lv in levels]
    assert rows == sorted(rows)  # head at the top of the image: levels descend down the rows
    for lv in levels:
        k, j, i = vox[lv]
        assert 0 <= k < p.volume.shape[0]
        mm = np.asarray(p.labels["level_centers_mm"][lv])
        assert np.allclose(p.volume.affine() @ np.array([k, j, i, 1.0]), [*mm, 1.0], atol=0.01)
        # the level centre is in the canal
        assert (p.masks["canal"] | p.masks["cauda_equina"] | p.masks[f"narrowing_{lv}"])[
            max(k - 1, 0) : k + 2, j - 2 : j + 3, i - 2 : i + 3
        ].any()


@pytest.mark.parametrize(
    "anatomy,label",
    [
        ("knee", {"acl": "complete", "meniscus_tear": True}),
        ("shoulder", {"cuff": "partial"}),
        ("lumbar_spine", {"stenosis": "severe"}),
    ],
)
def test_lesion_centres_are_on_the_lesion(anatomy, label):
    p = generate(anatomy, 90, **label, **SMALL)
    masks = {"acl": "acl_lesion", "meniscus": "meniscus_lesion", "cuff": "cuff_lesion"}
    for key, kji in p.labels["lesion_centers_vox"].items():
        mm = np.asarray(p.labels["lesion_centers_mm"][key])
        assert np.allclose((p.volume.affine() @ np.array([*kji, 1.0]))[:3], mm, atol=0.01)
        m = p.masks.get(masks.get(key, f"narrowing_{key}"))
        if anatomy != "lumbar_spine":
            assert m[kji], key


def test_bad_requests_are_refused_clearly():
    with pytest.raises(PhantomError, match="unknown anatomy"):
        generate("elbow", 1)
    with pytest.raises(PhantomError, match="acl must be one of"):
        generate("knee", 1, acl="torn")
    with pytest.raises(PhantomError, match="unknown override"):
        generate("knee", 1, colour="blue")
    with pytest.raises(PhantomError, match="unknown level"):
        generate("lumbar_spine", 1, stenosis={"L6-S1": "mild"})
    with pytest.raises(PhantomError, match="unknown grade"):
        generate("lumbar_spine", 1, stenosis={"L4-L5": "extreme"})
    with pytest.raises(PhantomError, match="sequence"):
        generate("shoulder", 1, sequence="DWI")
    with pytest.raises(PhantomError, match="seed"):
        generate("knee", -1)


# ---------------------------------------------------------------- no label leakage


def _tasks(anatomy, labs):
    if anatomy == "knee":
        return {"acl_tear": [lb["acl_tear"] for lb in labs], "meniscus_tear": [lb["meniscus_tear"] for lb in labs]}
    if anatomy == "shoulder":
        return {
            "cuff_tear": [int(lb["cuff"] != "none") for lb in labs],
            "cuff_full": [int(lb["cuff"] == "full_thickness") for lb in labs],
        }
    return {
        f"{lv}_stenosis": [int(lb["stenosis"][lv] in ("moderate", "severe")) for lb in labs]
        for lv in ("L3-L4", "L4-L5", "L5-S1")
    }


def _features_and_labels(anatomy: str, seed: int):
    p = generate(anatomy, seed, **SMALL)
    return global_features(p.volume), p.labels


@pytest.mark.slow  # generates and fits hundreds of phantoms: 10-20 s per anatomy (on one core)
@pytest.mark.parametrize("anatomy", ["knee", "shoulder", "lumbar_spine"])
def test_global_statistics_do_not_predict_the_label(anatomy):
    """Shortcut baseline on 100 phantoms: logistic regression on global intensity and size
    statistics must not predict the label (AUC <= 0.65).

    The phantoms are independent of each other (one seed each): they are generated on up to two
    cores, in processes started for this test and stopped with it; the results come back in seed order."""
    seeds = range(5000, 5100)
    workers = min(2, len(os.sched_getaffinity(0)))
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # not a fork of the test process (threads, torch)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            samples = list(pool.map(_features_and_labels, itertools.repeat(anatomy), seeds, chunksize=5))
    else:
        samples = [_features_and_labels(anatomy, s) for s in seeds]
    feats = np.asarray([f for f, _ in samples])
    labs = [lb for _, lb in samples]
    for task, y in _tasks(anatomy, labs).items():
        auc = shortcut_auc(feats, y)
        assert auc <= 0.65, (task, auc)


def test_shortcut_baseline_detects_a_real_leak():
    """The baseline is not blind: a label that shifts global brightness is caught."""
    feats, y = [], []
    for s in range(6000, 6060):
        p = generate("knee", s, matrix=64, n_slices=8)
        label = s % 2
        arr = p.volume.array * (1.3 if label else 1.0) + (200.0 if label else 0.0)
        feats.append(global_features(arr, p.volume.spacing))
        y.append(label)
    assert shortcut_auc(np.asarray(feats), y) > 0.8

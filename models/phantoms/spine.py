"""Lumbar spine phantom (default: sagittal T2 TSE).

Anatomy frame (mm): x towards patient left, y towards posterior, z towards superior; the
column is built from the sacral endplate upwards with a sacral slope, per-disc lordotic
wedges and a mild scoliosis (lateral offset up to 5 mm). Structures: body outline (skin,
subcutaneous fat, paraspinal muscle with fat septa), abdominal viscera with bowel loops,
aorta and IVC, psoas; T11..L5 vertebral bodies and the sacrum (S1..S4) with cortex and marrow, discs (annulus + nucleus), pedicles, laminae, spinous processes and facets,
epidural fat, the dural sac (CSF) with conus medullaris and cauda equina roots lying
dorsally, ligamentum flavum at every disc level, foraminal fat and exiting roots.
Stenosis: at each level L1-L2 .. L5-S1 the midline canal AP diameter is narrowed by a
posterior disc bulge plus ligamentum flavum thickening; the grade is set by the narrowing
share (SPEC: normal / mild / moderate / severe ranges, with gaps between them). Nuisance
(any grade): disc degeneration (dark nucleus, lower disc), small bulges at normal levels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.phantoms.common import (
    Phantom,
    Streams,
    apply_overrides,
    choice,
    draw_nuisances,
    fat_septa,
    make_geometry,
    render,
    series_uids,
    uniform,
    vox_and_mm,
)
from models.phantoms.errors import PhantomError
from models.phantoms.shapes import Ellipsoid, Layer, Structure, Tube, rotation
from models.phantoms.spec import GENERATOR_VERSION, SpineSpec

LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
GRADES = ("normal", "mild", "moderate", "severe")
LABEL_KEYS = {"stenosis"}

# (name, body height mm, body half-width x, body half-depth y), top to bottom
_VERTEBRAE = (
    ("T11", 22.0, 18.0, 13.5),
    ("T12", 23.5, 19.5, 14.5),
    ("L1", 25.0, 21.0, 15.0),
    ("L2", 26.0, 22.0, 15.5),
    ("L3", 27.0, 23.0, 16.0),
    ("L4", 27.0, 24.0, 16.5),
    ("L5", 26.0, 25.0, 17.0),
)
# disc below each vertebra above: (name, height, lordotic wedge deg)
_DISCS = (
    ("T11-T12", 6.0, -3.0),
    ("T12-L1", 7.0, 0.0),
    ("L1-L2", 8.5, 4.0),
    ("L2-L3", 9.5, 6.0),
    ("L3-L4", 10.0, 9.0),
    ("L4-L5", 11.0, 12.0),
    ("L5-S1", 10.0, 15.0),
)
# wedge of the vertebral body itself (lordotic, degrees), same order as _VERTEBRAE
_BODY_WEDGE = (0.0, 0.0, -2.0, -1.0, 0.0, 2.0, 4.0)


def _frame(phi_deg: float):
    """(up normal, posterior axis) of a vertebra tilted forward by phi degrees."""
    t = np.deg2rad(phi_deg)
    return np.array([0.0, -np.sin(t), np.cos(t)]), np.array([0.0, np.cos(t), np.sin(t)])


def generate_spine(seed: int, spec: SpineSpec, overrides: dict[str, Any]) -> Phantom:
    st = Streams("lumbar_spine", seed)
    grades = {lv: choice(st.labels, spec.grade_probs) for lv in LEVELS}
    if "stenosis" in overrides:
        forced = overrides["stenosis"]
        if isinstance(forced, str):
            forced = dict.fromkeys(LEVELS, forced)
        if not isinstance(forced, dict):
            raise PhantomError("stenosis must be a grade or a dict level -> grade")
        for lv, g in forced.items():
            if lv not in LEVELS:
                raise PhantomError(f"unknown level {lv!r}; expected one of {', '.join(LEVELS)}")
            if g not in GRADES:
                raise PhantomError(f"unknown grade {g!r} at {lv}; expected one of {', '.join(GRADES)}")
            grades[lv] = g

    # anatomy
    ra = st.anatomy
    A = {
        "sacral_slope": float(ra.uniform(32.0, 45.0)),
        "wedge_jit": ra.uniform(-2.0, 2.0, size=len(_DISCS)),
        "disc_h_jit": ra.uniform(0.88, 1.12, size=len(_DISCS)),
        "body_h_jit": ra.uniform(0.94, 1.06, size=len(_VERTEBRAE)),
        "canal_ap": uniform(ra, spec.canal_ap_mm),
        "canal_ap_jit": ra.uniform(-0.8, 0.8, size=len(_DISCS)),
        "canal_w": float(ra.uniform(10.0, 12.5)),
        "flavum_t": float(ra.uniform(2.0, 3.5)),
        "subcut": float(ra.uniform(10.0, 40.0)),
        "abdomen": float(ra.uniform(0.9, 1.15)),
        "roots": int(ra.integers(8, 13)),
        "root_xy": ra.uniform(-1.0, 1.0, size=(12, 2)),
        "cortex": float(ra.uniform(0.9, 1.4)),
        "bowel": [
            (
                ra.uniform((-90.0, -170.0, -150.0), (90.0, -45.0, 150.0)),
                ra.uniform(6.0, 22.0, size=3),
                float(ra.uniform(0, 180)),
                float(ra.uniform()),
            )
            for _ in range(16)
        ],
        "septa": fat_septa(ra, 5, (-60.0, 30.0, -150.0), (60.0, 90.0, 150.0), size=(20.0, 50.0), length=(60.0, 150.0)),
        # mild scoliosis: lateral offset of the column, 0 at the sacrum
        "scoliosis_mm": float(ra.uniform(-5.0, 5.0)),
        "scoliosis_len": float(ra.uniform(180.0, 320.0)),
    }
    # lesions / per-level nuisances (drawn for every level whatever its grade: stable streams)
    L = st.lesion
    per = {}
    for lv in _DISCS:
        name = lv[0]
        per[name] = {
            "u": float(L.uniform()),  # position inside the grade's narrowing range
            "disc_share": uniform(L, spec.disc_share),
            "degenerated": bool(L.uniform() < spec.disc_degeneration_prob),
            "x_off": float(L.uniform(-2.0, 2.0)),
        }
    n = draw_nuisances(st.acquisition, spec.acquisition)
    n["orientation"] = "sagittal"
    apply_overrides(n, overrides, LABEL_KEYS)

    narrowing = {}
    for name, *_ in _DISCS:
        g = grades.get(name, "normal")
        lo, hi = spec.narrowing[g]
        narrowing[name] = lo + (hi - lo) * per[name]["u"]

    geom = make_geometry(
        n,
        plane=n["orientation"],
        center=(0.0, 15.0, 0.0),
        t_patient=(0.0, 0.0, -100.0),
        spec_slices=spec.acquisition.n_slices,
    )
    structures, level_points = _structures(A, per, narrowing, grades)
    lesion_groups = tuple(f"narrowing_{lv}" for lv in LEVELS)
    rendered = render(structures, geom, n, st, lesion_groups=lesion_groups)

    lv_vox, lv_mm = {}, {}
    for lv in LEVELS:
        lv_vox[lv], lv_mm[lv] = vox_and_mm(geom, geom.index_of_anatomy(level_points[lv]))
    labels = {
        "stenosis": {lv: grades[lv] for lv in LEVELS},
        "stenosis_grade_index": {lv: GRADES.index(grades[lv]) for lv in LEVELS},
        "canal_narrowing": {lv: round(float(narrowing[lv]), 4) for lv in LEVELS},
        "level_centers_vox": lv_vox,
        "level_centers_mm": lv_mm,
        # lesion centres of graded (>= mild) levels, for saliency checks
        "lesion_centers_vox": {lv: lv_vox[lv] for lv in LEVELS if grades[lv] != "normal"},
        "lesion_centers_mm": {lv: lv_mm[lv] for lv in LEVELS if grades[lv] != "normal"},
    }
    study, series, frame = series_uids("lumbar_spine", seed, n, n["orientation"])
    volume = geom.volume(
        rendered.array,
        study_uid=study,
        series_uid=series,
        frame_of_reference_uid=frame,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        modality="MR",
        body_part="LSPINE",
        attributes={
            "sequence": n["sequence"],
            "orientation": n["orientation"],
            "slice_thickness": geom.slice_thickness,
            "phantom_seed": seed,
            "phantom_generator": GENERATOR_VERSION,
        },
    )
    params = dict(n)
    params["canal_ap_mm"] = A["canal_ap"]
    params.update({f"level_{k}": v for k, v in per.items()})
    return Phantom(anatomy="lumbar_spine", seed=seed, volume=volume, labels=labels, masks=rendered.masks, params=params)


def _structures(
    A: dict[str, Any],
    per: dict[str, dict[str, Any]],
    narrowing: dict[str, float],
    grades: dict[str, str],
) -> tuple[list[Structure], dict[str, np.ndarray]]:
    S: list[Structure] = []
    ct = A["cortex"]
    # ---- build the column from the S1 endplate upwards
    phi = A["sacral_slope"]
    c = np.array([0.0, 0.0, -95.0])  # S1 superior endplate centre
    verts = []  # (name, centre, phi, h, rx, ry)
    discs = []  # (name, centre, phi, h, rx, ry)
    for i in range(len(_DISCS) - 1, -1, -1):
        dname, dh, wedge = _DISCS[i]
        vname, vh, vrx, vry = _VERTEBRAE[i]
        dh = dh * A["disc_h_jit"][i] * (0.78 if per[dname]["degenerated"] else 1.0)
        vh = vh * A["body_h_jit"][i]
        w = wedge + A["wedge_jit"][i]
        phi_mid = phi - w / 2
        up, _ = _frame(phi_mid)
        discs.append((dname, c + up * dh / 2, phi_mid, dh, vrx, vry))
        c = c + up * dh
        phi = phi - w
        bw = _BODY_WEDGE[i]
        up, _ = _frame(phi - bw / 2)
        verts.append((vname, c + up * vh / 2, phi - bw / 2, vh, vrx, vry))
        c = c + up * vh
        phi = phi - bw

    # mild scoliosis: shift every lumbar/thoracic element sideways along a smooth curve
    def lateral(z):
        return A["scoliosis_mm"] * np.sin(np.pi * min(max((z + 95.0) / A["scoliosis_len"], 0.0), 1.0))

    verts = [(nm, cen + np.array([lateral(cen[2]), 0.0, 0.0]), *rest) for nm, cen, *rest in verts]
    discs = [(nm, cen + np.array([lateral(cen[2]), 0.0, 0.0]), *rest) for nm, cen, *rest in discs]
    # sacrum downwards from the S1 endplate: S1..S4, curving forward
    sac = []
    c = np.array([0.0, 0.0, -95.0])
    phi = A["sacral_slope"]
    for k, (h, rx, ry) in enumerate(((26.0, 24.0, 17.0), (20.0, 20.0, 14.0), (16.0, 15.0, 11.0), (12.0, 11.0, 8.0))):
        up, _ = _frame(phi)
        sac.append((f"S{k + 1}", c - up * h / 2, phi, h, rx, ry))
        c = c - up * (h + 1.5)
        phi = phi + 12.0

    # ---- body outline and soft tissues
    sub = A["subcut"]
    outline = Ellipsoid((0.0, -35.0, 0.0), (150.0, 105.0 + sub, 1e3))
    S.append(Structure("skin", "skin", outline, group="soft_tissue"))
    S.append(Structure("subcutaneous_fat", "fat", Layer(outline, 2.0, 105.0 + sub), group="soft_tissue"))
    S.append(Structure("muscle", "muscle", Layer(outline, 2.0 + sub, 105.0 + sub), group="soft_tissue"))
    ab = A["abdomen"]
    S.append(
        Structure(
            "viscera",
            "viscera",
            Ellipsoid((0.0, -100.0, 10.0), (120.0 * ab, 62.0 * ab, 1e3)),
            over=("muscle",),
            group="soft_tissue",
            extra={"texture": 0.7},
        )
    )
    # bowel loops: fluid-filled (bright on T2) or gas-filled (signal void)
    for c, r, ang, kind in A["bowel"]:
        shape = Ellipsoid(c, r, rot=rotation("y", ang))
        if kind < 0.6:
            S.append(
                Structure(
                    "bowel_fluid",
                    "fluid",
                    shape,
                    over=("viscera",),
                    group="soft_tissue",
                    extra={"contrast": 0.45 + 0.5 * kind, "texture": 2.0},
                )
            )
        else:
            S.append(Structure("bowel_gas", "air", shape, over=("viscera", "bowel_fluid"), group="soft_tissue"))
    for c, radii, rot in A["septa"]:
        S.append(Structure("septum", "fat", Ellipsoid(c, radii, rot=rot), over=("muscle",), group="soft_tissue"))
    # retroperitoneal fat anterior to the column, vessels
    ant = min(v[1][1] - v[5] for v in verts)  # most anterior body margin (y)
    S.append(
        Structure(
            "retroperitoneal_fat",
            "fat",
            Ellipsoid((0.0, ant - 10.0, 0.0), (38.0, 14.0, 1e3)),
            over=("muscle", "viscera"),
            group="soft_tissue",
        )
    )
    aorta_pts = [(14.0, v[1][1] - v[5] - 11.0, v[1][2]) for v in verts if v[0] not in ("L5",)]
    S.append(Structure("aorta", "artery", Tube(aorta_pts[::-1], (9.0, 9.0)), group="vessels"))
    ivc_pts = [(-16.0, v[1][1] - v[5] - 9.0, v[1][2]) for v in verts]
    S.append(Structure("ivc", "vein", Tube(ivc_pts[::-1], (10.0, 8.0)), group="vessels"))
    for sgn in (-1.0, 1.0):
        S.append(
            Structure(
                "psoas",
                "muscle",
                Ellipsoid((sgn * 42.0, 0.0, -40.0), (22.0, 22.0, 120.0)),
                over=("viscera", "retroperitoneal_fat"),
                group="soft_tissue",
            )
        )
        S.append(
            Structure(
                "paraspinal_fat",
                "fat",
                Ellipsoid((sgn * 9.0, 68.0, 0.0), (5.0, 24.0, 1e3)),
                over=("muscle",),
                group="soft_tissue",
            )
        )

    # ---- canal centreline: body / disc centres moved posteriorly
    ap0 = A["canal_ap"]
    items = sorted(verts + discs, key=lambda t: -t[1][2])  # top to bottom
    canal_pts = []
    for _name, cen, ph, _h, _rx, ry in items:
        _, post = _frame(ph)
        canal_pts.append(cen + post * (ry + 1.5 + ap0 / 2))
    for _name, cen, ph, _h, _rx, ry in sac[:2]:
        _, post = _frame(ph)
        canal_pts.append(cen + post * (ry + 1.5 + ap0 / 2 * 0.8))
    top = canal_pts[0] + np.array([0.0, 0.0, 60.0])
    canal_pts = [top] + canal_pts
    cw = A["canal_w"]
    epi = Tube([p + np.array([0.0, 1.5, 0.0]) for p in canal_pts], (cw + 2.5, ap0 / 2 + 2.5), up=(1, 0, 0))
    S.append(Structure("epidural_fat", "fat", epi, group="epidural_fat"))
    sac_end = len(canal_pts) - 2  # dural sac ends at S2
    dura = Tube(canal_pts[: sac_end + 1], (cw, ap0 / 2), up=(1, 0, 0))
    S.append(Structure("csf", "csf", dura, group="canal"))
    # cord down to the conus at L1
    l1 = next(v for v in verts if v[0] == "L1")
    conus_tip = l1[1] + _frame(l1[2])[1] * (l1[5] + 1.5 + ap0 / 2) - np.array([0.0, 0.0, 6.0])
    t12 = next(v for v in verts if v[0] == "T12")
    t12c = t12[1] + _frame(t12[2])[1] * (t12[5] + 1.5 + ap0 / 2)
    S.append(Structure("cord", "cord", Tube([top, t12c], (4.5, 4.0), up=(1, 0, 0)), over=("csf",), group="cord"))
    S.append(Structure("conus", "cord", Tube([t12c, conus_tip], (3.0, 2.6), up=(1, 0, 0)), over=("csf",), group="cord"))
    # cauda equina: roots lying dorsally in the sac
    for r in range(A["roots"]):
        dx, dy = A["root_xy"][r]
        off = np.array([dx * cw * 0.55, (0.35 + 0.3 * abs(dy)) * ap0 / 2, 0.0])
        pts = [conus_tip + off * 0.3] + [p + off for p in canal_pts[1 : sac_end + 1] if p[2] < conus_tip[2]]
        if len(pts) >= 2:
            S.append(
                Structure("root", "nerve", Tube(pts, (0.9, 0.9), up=(1, 0, 0)), over=("csf",), group="cauda_equina")
            )

    # ---- discs (annulus + nucleus)
    for name, cen, ph, h, rx, ry in discs:
        rot = rotation("x", ph)
        S.append(
            Structure(
                f"disc_{name}",
                "annulus",
                Ellipsoid(cen, (rx - 0.5, ry - 0.3, h / 2 + 2.5), power=(2, 4, 2), rot=rot),
                group="discs",
            )
        )
        degen = per[name]["degenerated"]
        S.append(
            Structure(
                f"nucleus_{name}",
                "nucleus",
                Ellipsoid(cen + _frame(ph)[1] * 1.5, (rx * 0.55, ry * 0.5, h / 2 * 0.7), rot=rot),
                group="discs",
                extra={"contrast": 0.3} if degen else {},
            )
        )
    # ---- bony column: bodies (cortex + marrow), sacrum
    for name, cen, ph, h, rx, ry in verts + sac:
        rot = rotation("x", ph)
        body = Ellipsoid(cen, (rx, ry, h / 2), power=(2, 4, 6), rot=rot)
        S.append(Structure(f"{name}_cortex", "cortex", body, group="vertebrae"))
        S.append(
            Structure(
                f"{name}_marrow",
                "red_marrow",
                Ellipsoid(cen, (rx - ct, ry - ct, h / 2 - ct), power=(2, 4, 6), rot=rot),
                group="vertebrae",
            )
        )
    # posterior elements per vertebra: pedicles, lamina, spinous process
    for name, cen, ph, h, _rx, ry in verts + sac[:1]:
        up, post = _frame(ph)
        rot = rotation("x", ph)
        wall = cen + post * (ry + 1.5 + ap0 + 1.5)  # posterior canal wall
        parts = []
        for sgn in (-1.0, 1.0):
            parts.append(
                Ellipsoid(
                    cen + post * (ry + 1.5 + ap0 / 2) + np.array([sgn * (cw + 4.5), 0.0, 0.0]) + up * 3.0,
                    (4.5, ap0 / 2 + 6.0, 7.0),
                    rot=rot,
                )
            )
        lam = Ellipsoid(wall + post * 4.0 - up * 2.0, (cw + 5.0, 4.0, h * 0.38), rot=rot)
        sp = Ellipsoid(wall + post * 22.0 - up * 5.0, (3.5, 17.0, 9.0), rot=rotation("x", ph + 12.0))
        for sgn in (-1.0, 1.0):  # facets (articular processes) lateral to the canal
            parts.append(
                Ellipsoid(wall + np.array([sgn * (cw + 5.0), 0.0, 0.0]) - up * (h / 2), (5.5, 6.0, 9.0), rot=rot)
            )
        for k, part in enumerate(parts + [lam, sp]):
            S.append(Structure(f"{name}_post{k}", "cortex", part, group="vertebrae"))
            S.append(Structure(f"{name}_post{k}_marrow", "red_marrow", part.grown(-ct), group="vertebrae"))
    # ---- per disc level: foramina, ligamentum flavum, bulge (stenosis)
    level_points = {}
    for name, cen, ph, h, _rx, ry in discs:
        up, post = _frame(ph)
        rot = rotation("x", ph)
        k = [d[0] for d in _DISCS].index(name)
        ap = ap0 + A["canal_ap_jit"][k]
        ant_wall = cen + post * (ry + 1.5)
        canal_c = ant_wall + post * (ap / 2)
        post_wall = ant_wall + post * ap
        level_points[name] = canal_c
        for sgn in (-1.0, 1.0):
            fo = cen + post * (ry + 4.0) + np.array([sgn * (cw + 5.0), 0.0, 0.0]) + up * (h / 2 + 4.0)
            S.append(
                Structure(
                    "foraminal_fat",
                    "fat",
                    Ellipsoid(fo, (4.5, 5.0, 8.0), rot=rot),
                    over=("muscle", "epidural_fat", "paraspinal_fat"),
                    group="soft_tissue",
                )
            )
            S.append(
                Structure(
                    "exiting_root",
                    "nerve",
                    Ellipsoid(fo + up * 2.0, (3.0, 2.2, 2.5), rot=rot),
                    over=("foraminal_fat",),
                    group="cauda_equina",
                )
            )
        nar = narrowing[name] * ap
        share = per[name]["disc_share"]
        b, f = nar * share, nar * (1.0 - share)
        tf = A["flavum_t"]
        # lesion masks only for graded levels: a physiological bulge at a normal level is anatomy
        graded = name in LEVELS and grades[name] != "normal"
        grp = f"narrowing_{name}" if graded else "discs"
        soft = ("csf", "epidural_fat", "root", "cord", "conus")
        # ligamentum flavum: from tf behind the posterior wall to f in front of it
        S.append(
            Structure(
                "flavum",
                "ligament",
                Ellipsoid(post_wall + post * tf / 2, (cw * 0.85 + 1.0, tf / 2 + 0.3, h / 2 + 6.0), rot=rot),
                over=soft + ("muscle",),
                group="flavum",
            )
        )
        if f > 0.3 and name in LEVELS:
            S.append(
                Structure(
                    "flavum_thickening",
                    "ligament",
                    Ellipsoid(post_wall - post * f / 2, (cw * 0.85 + 1.0, f / 2 + 0.3, h / 2 + 5.0), rot=rot),
                    over=soft,
                    group=grp if graded else "flavum",
                )
            )
        # posterior disc bulge: from inside the disc to b in front of the anterior canal wall
        y0, y1 = ry - 3.0, ry + 1.5 + b
        xo = per[name]["x_off"]
        bulge = Ellipsoid(
            cen + post * (y0 + y1) / 2 + np.array([xo, 0.0, 0.0]),
            (cw * 0.9 + 0.4 * b, (y1 - y0) / 2, h / 2 + 0.6),
            rot=rot,
        )
        S.append(Structure("bulge", "annulus", bulge, over=soft + ("flavum", "flavum_thickening"), group=grp))
    return S, level_points

"""Shoulder phantom (default: coronal-oblique T2 fat-sat, parallel to the supraspinatus).

Anatomy frame (mm): origin at the centre of the humeral head, x towards LATERAL along the
supraspinatus, y towards posterior, z towards superior. The slice grid is prescribed in this
frame; the frame is rotated about the patient's z axis by the scapular-plane angle (so the
written series is coronal-oblique in patient coordinates) and mirrored for a right shoulder.
Structures: body outline (skin, subcutaneous fat, muscle: deltoid, trapezius), humeral head
with greater tuberosity and shaft (cortex, marrow, articular cartilage), glenoid with
cartilage and labrum, scapular body and spine, acromion, clavicle, coracoid,
supraspinatus muscle (fat sheath) and tendon draped over the head to the greater tuberosity,
infraspinatus tendon, long head of biceps, subacromial-subdeltoid bursa with peribursal fat,
glenohumeral joint fluid. Lesions: partial-thickness (articular, bursal or intrasubstance)
and full-thickness supraspinatus tears (fluid-filled defect from the footprint, medial
retraction of the stump). Mimic (any label): tendinosis (intermediate intratendinous signal).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.phantoms.common import (
    Phantom,
    Streams,
    apply_overrides,
    centre_of,
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
from models.phantoms.shapes import (
    Ellipsoid,
    Func,
    HalfSpace,
    Intersection,
    Layer,
    SmoothUnion,
    Structure,
    Tube,
    rotation,
)
from models.phantoms.spec import GENERATOR_VERSION, ShoulderSpec

LABEL_KEYS = {"cuff", "laterality"}
CUFF_CLASSES = ("none", "partial", "full_thickness")


def _arc(radius: float, th0: float, th1: float, step: float = 8.0, y: float = 0.0) -> list[np.ndarray]:
    """Points on a circle in the x-z plane around the head centre; angle 0 = superior, + = lateral."""
    ths = np.arange(th0, th1 + 1e-6, step)
    if ths[-1] < th1 - 1e-6:
        ths = np.append(ths, th1)
    return [np.array([radius * np.sin(np.deg2rad(t)), y, radius * np.cos(np.deg2rad(t))]) for t in ths]


def _draw_anatomy(rng) -> dict[str, Any]:
    a = {}
    a["head_r"] = float(rng.uniform(22.0, 26.0))
    a["cart"] = float(rng.uniform(1.2, 1.8))
    a["tendon_t"] = float(rng.uniform(4.8, 6.2))  # supraspinatus tendon thickness
    a["tendon_w"] = float(rng.uniform(20.0, 26.0))  # antero-posterior width
    a["ahi"] = float(rng.uniform(1.5, 4.0))  # space above the tendon (bursa + fat) below the acromion
    a["subcut"] = float(rng.uniform(4.0, 12.0))
    a["deltoid"] = float(rng.uniform(14.0, 22.0))
    a["cortex"] = float(rng.uniform(1.0, 1.6))
    a["joint_fluid"] = float(rng.uniform(0.3, 1.5))
    a["acromion_tilt"] = float(rng.uniform(-8.0, 8.0))
    a["insertion_deg"] = float(rng.uniform(58.0, 70.0))
    a["septa"] = fat_septa(rng, 6, (-90.0, -40.0, -60.0), (50.0, 40.0, 60.0))
    return a


def generate_shoulder(seed: int, spec: ShoulderSpec, overrides: dict[str, Any]) -> Phantom:
    st = Streams("shoulder", seed)
    cuff = choice(st.labels, spec.cuff_probs)
    laterality = "R" if st.labels.uniform() < 0.7 else "L"
    if "cuff" in overrides:
        cuff = overrides["cuff"]
        if cuff not in CUFF_CLASSES:
            raise PhantomError(f"cuff must be one of {CUFF_CLASSES}, got {cuff!r}")
    if "laterality" in overrides:
        laterality = overrides["laterality"]
        if laterality not in ("R", "L"):
            raise PhantomError("laterality must be 'R' or 'L'")

    A = _draw_anatomy(st.anatomy)
    L = st.lesion
    small = bool(L.uniform() < spec.full_retraction_small_share)
    les: dict[str, Any] = dict(
        dist_ins=float(L.uniform(3.0, 14.0)),  # tear centre from the footprint (critical zone), mm
        y_c=float(L.uniform(-6.0, 6.0)),
        side=choice(L, spec.partial_side_probs),
        depth=uniform(L, spec.partial_depth_fraction),
        p_len=uniform(L, spec.partial_length_mm),
        p_width=uniform(L, spec.partial_width_mm),
        f_width=uniform(L, spec.full_width_mm),
        retraction=float(L.uniform(0.0, 5.0)) if small else uniform(L, spec.full_retraction_mm),
        footprint_gap=float(L.uniform(2.0, 6.0)),
        contrast=uniform(L, spec.lesion_contrast),
        tendinosis=bool(L.uniform() < spec.tendinosis_prob),
        tend_pos=float(L.uniform(4.0, 20.0)),
        tend_len=float(L.uniform(6.0, 16.0)),
        tend_contrast=uniform(L, spec.tendinosis_contrast),
        bursal_fluid=uniform(L, spec.bursal_fluid_mm),
        oblique_deg=float(L.uniform(25.0, 45.0)),
    )
    n = draw_nuisances(st.acquisition, spec.acquisition)
    n["orientation"] = "coronal"
    n["laterality"] = laterality
    apply_overrides(n, overrides, LABEL_KEYS)
    lat = n["laterality"]
    mirror = (-1.0, 1.0, 1.0) if lat == "R" else (1.0, 1.0, 1.0)
    alpha = les["oblique_deg"] if lat == "R" else -les["oblique_deg"]
    centre = np.array([-6.0, 0.0, 6.0]) * np.asarray(mirror)
    geom = make_geometry(
        n,
        plane=n["orientation"],
        center=tuple(centre),
        mirror=mirror,
        r_patient=rotation("z", alpha),
        t_patient=(-170.0 if lat == "R" else 170.0, 10.0, 0.0),
        spec_slices=spec.acquisition.n_slices,
    )
    structures, info = _structures(A, les, cuff)
    rendered = render(structures, geom, n, st, lesion_groups=("cuff_lesion",))

    labels: dict[str, Any] = {"cuff": cuff, "cuff_tear": int(cuff != "none"), "laterality": lat}
    cv, cm, sv, sm = {}, {}, {}, {}
    sv["supraspinatus"], sm["supraspinatus"] = vox_and_mm(geom, geom.index_of_anatomy(info["critical_zone"]))
    if cuff != "none":
        c = centre_of(rendered.masks["cuff_lesion"])
        kji = c if c is not None else geom.index_of_anatomy(info["lesion"])
        cv["cuff"], cm["cuff"] = vox_and_mm(geom, kji)
    labels.update(lesion_centers_vox=cv, lesion_centers_mm=cm, structure_centers_vox=sv, structure_centers_mm=sm)
    if cuff == "partial":
        labels["cuff_partial_side"] = les["side"]
    if cuff == "full_thickness":
        labels["cuff_retraction_mm"] = round(les["retraction"], 2)

    study, series, frame = series_uids("shoulder", seed, n, n["orientation"])
    volume = geom.volume(
        rendered.array,
        study_uid=study,
        series_uid=series,
        frame_of_reference_uid=frame,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        modality="MR",
        body_part="SHOULDER",
        laterality=lat,
        attributes={
            "sequence": n["sequence"],
            "orientation": n["orientation"],
            "slice_thickness": geom.slice_thickness,
            "phantom_seed": seed,
            "phantom_generator": GENERATOR_VERSION,
        },
    )
    params = dict(n)
    params.update({f"lesion_{k}": v for k, v in les.items()})
    return Phantom(anatomy="shoulder", seed=seed, volume=volume, labels=labels, masks=rendered.masks, params=params)


def _structures(A, les, cuff: str):
    S: list[Structure] = []
    R = A["head_r"]
    c = A["cart"]
    T = A["tendon_t"]
    W = A["tendon_w"]
    # ---- body outline: shoulder cap + upper arm + trunk/neck, as a blended solid
    shaft_dir = np.array([0.25, 0.0, -1.0])
    shaft_dir /= np.linalg.norm(shaft_dir)
    arm_rot = rotation("y", np.rad2deg(np.arctan2(shaft_dir[0], -shaft_dir[2])))
    cap_r = R + A["deltoid"] + A["subcut"] + 4.0
    body = SmoothUnion(
        (
            Ellipsoid((-4.0, 2.0, 4.0), (cap_r, cap_r * 0.95, cap_r)),
            Ellipsoid((-120.0, 10.0, -60.0), (115.0, 95.0, 200.0)),
            Ellipsoid(shaft_dir * 110.0, (R + 18.0, R + 18.0, 140.0), rot=arm_rot),
        ),
        2,
    )
    S.append(Structure("skin", "skin", body, group="soft_tissue"))
    S.append(Structure("subcutaneous_fat", "fat", Layer(body, 1.5, cap_r), group="soft_tissue"))
    S.append(Structure("muscle", "muscle", Layer(body, 1.5 + A["subcut"], cap_r), group="soft_tissue"))
    inner = ("muscle",)
    for cc, radii, rot in A["septa"]:
        S.append(Structure("septum", "fat", Ellipsoid(cc, radii, rot=rot), over=inner, group="soft_tissue"))
    # deltoid: separated from the cuff and the trapezius by a fat plane over the head
    S.append(
        Structure(
            "subdeltoid_fat",
            "fat",
            Intersection(
                (Ellipsoid((0, 0, 0), (R + A["deltoid"] * 0.45 + 1.0,) * 3), HalfSpace((0, 0, 0), (-1.0, 0.0, -0.35)))
            )
            - Ellipsoid((0, 0, 0), (R + A["deltoid"] * 0.45,) * 3),
            over=inner,
            group="soft_tissue",
        )
    )
    # ---- supraspinatus muscle in its fossa, wrapped in a thin fat plane
    ssp = Ellipsoid((-62.0, 6.0, 24.0), (46.0, 15.0, 12.0), rot=rotation("y", -6.0))
    S.append(Structure("supraspinatus_fat", "fat", ssp.grown(1.6), over=inner, group="soft_tissue"))
    S.append(Structure("supraspinatus_muscle", "muscle", ssp, group="supraspinatus_muscle"))
    # ---- glenohumeral joint fluid (thin rim + axillary recess)
    jf = A["joint_fluid"]
    S.append(
        Structure(
            "joint_fluid",
            "fluid",
            Intersection(
                (Ellipsoid((0, 0, 0), (R + c + jf + 1.2,) * 3), Ellipsoid((-R, 0.0, -2.0), (12.0, 17.0, 25.0)))
            ),
            over=inner,
            group="joint_fluid",
        )
    )
    S.append(
        Structure(
            "axillary_recess",
            "fluid",
            Ellipsoid((-12.0, 0.0, -R - 2.0), (7.0, 10.0, 3.0 + jf)),
            over=inner,
            group="joint_fluid",
        )
    )
    # ---- supraspinatus tendon: a band draped over the head to the greater tuberosity
    r_mid = R + c + 0.2 + T / 2
    th_ins = A["insertion_deg"]
    pts = [np.array([-34.0, 4.0, r_mid + 1.0]), np.array([-22.0, 1.5, r_mid * np.cos(np.deg2rad(-40)) + 0.5])]
    pts += _arc(r_mid, -40.0, th_ins, 8.0)
    tendon = Tube(pts, (W / 2, T / 2), up=(0, 1, 0))
    L_t = tendon.length
    # bursa and peribursal fat above the tendon, extending further down the tuberosity
    bf = les["bursal_fluid"]
    r_b = r_mid + T / 2 + bf / 2
    bursa = Tube(_arc(r_b, -35.0, min(th_ins + 30.0, 100.0), 8.0), (W / 2 + 4.0, bf / 2), up=(0, 1, 0))
    fat_r = r_mid + T / 2 + bf + 0.6
    pfat = Tube(_arc(fat_r, -35.0, min(th_ins + 30.0, 100.0), 8.0), (W / 2 + 6.0, 0.8), up=(0, 1, 0))
    S.append(Structure("peribursal_fat", "fat", pfat, over=inner, group="soft_tissue"))
    S.append(Structure("bursa", "fluid", bursa, over=inner + ("peribursal_fat",), group="bursa"))
    # infraspinatus tendon (posterior) and long head of biceps (anterior)
    infra = Tube(_arc(r_mid, -20.0, th_ins + 15.0, 8.0, y=W / 2 + 9.0), (9.0, T / 2), up=(0, 1, 0))
    S.append(Structure("infraspinatus_tendon", "tendon", infra, group="tendon"))
    biceps = Tube(
        [(-24.0, -4.0, 18.0), (-2.0, -16.0, R + c + 2.5), (16.0, -20.0, 8.0), (24.0, -20.0, -40.0)],
        (2.6, 2.2),
        up=(0, 1, 0),
    )
    S.append(Structure("biceps_tendon", "tendon", biceps, group="tendon"))
    S.append(Structure("supraspinatus_tendon", "tendon", tendon, group="supraspinatus_tendon"))
    s_ins = L_t  # insertion at the end of the band
    s_cz = s_ins - 10.0
    info = {"critical_zone": tendon.point_at(s_cz)}
    # ---- tendinosis mimic (any label)
    if les["tendinosis"]:
        s_m, h = s_ins - les["tend_pos"], les["tend_len"] / 2

        def tend(cc, _s=s_m, _h=h):
            lev, s, _a, b = tendon.param(cc)
            return (lev <= 0.8) & (np.abs(s - _s) <= _h) & (np.abs(b) <= T * 0.3)

        S.append(
            Structure(
                "tendinosis",
                "lesion",
                Func(tend, tendon.lo, tendon.hi),
                over=("supraspinatus_tendon",),
                group="supraspinatus_tendon",
                extra={"contrast": les["tend_contrast"], "texture": 2.0},
            )
        )
    # ---- tears
    yc = les["y_c"]
    if cuff == "partial":
        s_t = s_ins - les["dist_ins"]
        hl, hw, depth, side = les["p_len"] / 2, les["p_width"] / 2, les["depth"], les["side"]

        def partial(cc):
            lev, s, a, b = tendon.param(cc)
            m = (lev <= 1.0) & (np.abs(s - s_t) <= hl) & (np.abs(a - yc) <= hw)
            if side == "articular":
                return m & (b <= -T / 2 + depth * T)
            if side == "bursal":
                return m & (b >= T / 2 - depth * T)
            return m & (np.abs(b) <= depth * T / 2)

        S.append(
            Structure(
                "cuff_tear",
                "lesion",
                Func(partial, tendon.lo, tendon.hi),
                over=("supraspinatus_tendon", "tendinosis"),
                group="cuff_lesion",
                extra={"contrast": les["contrast"]},
            )
        )
        info["lesion"] = tendon.point_at(s_t)
    elif cuff == "full_thickness":
        gap = les["retraction"] + les["footprint_gap"]
        s0 = s_ins - gap
        hw = les["f_width"] / 2

        def full(cc):
            lev, s, a, _b = tendon.param(cc)
            return (lev <= 1.0) & (s >= s0) & (np.abs(a - yc) <= hw)

        S.append(
            Structure(
                "cuff_tear",
                "lesion",
                Func(full, tendon.lo, tendon.hi),
                over=("supraspinatus_tendon", "tendinosis"),
                group="cuff_lesion",
                extra={"contrast": les["contrast"]},
            )
        )
        info["lesion"] = tendon.point_at(s_ins - gap / 2)
    # ---- bones: humerus (head, tuberosity, shaft), cartilage first
    head = Ellipsoid((0, 0, 0), (R, R, R))
    tub = Ellipsoid((R * 0.95, 0.0, -R * 0.1), (8.0, 12.0, 14.0))  # greater tuberosity: footprint at the band end
    shaft = Ellipsoid(shaft_dir * 95.0, (13.0, 13.0, 80.0), rot=arm_rot)
    S.append(
        Structure(
            "humeral_cartilage",
            "cartilage",
            Intersection((head.grown(c), HalfSpace((0, 0, 0), (0.75, 0.0, -0.66)))),
            group="cartilage",
        )
    )
    ct = A["cortex"]
    hum = SmoothUnion((head, tub, shaft), 2)
    hum_in = SmoothUnion((head.grown(-ct), tub.grown(-ct), shaft.grown(-3.5)), 2)
    # glenoid: a cup facing the head, scapular neck and body (plate in the scapular plane)
    gap = c + 0.6 + 1.6
    cup = Ellipsoid((0, 0, 0), (R + gap,) * 3)
    S.append(
        Structure(
            "glenoid_cartilage",
            "cartilage",
            Intersection((Ellipsoid((-R - gap - 6.0, 0.0, -3.0), (12.0, 14.0, 19.0)), cup.grown(1.6))) - cup,
            group="cartilage",
        )
    )
    for zc in (17.0, -20.0):
        S.append(
            Structure(
                "labrum", "fibrocartilage", Ellipsoid((-R - 1.5, 0.0, zc), (4.0, 9.0, 4.5)), over=inner, group="labrum"
            )
        )
    scap_neck = Ellipsoid((-52.0, 4.0, -8.0), (22.0, 8.0, 16.0))
    scap_body = Ellipsoid((-95.0, 10.0, -30.0), (50.0, 3.5, 45.0))
    spine = Tube([(-90.0, 24.0, 18.0), (-40.0, 22.0, 26.0), (-12.0, 14.0, R + c + T + 9.0)], (4.0, 6.0), up=(0, 1, 0))
    zac = R + c + 0.2 + T + A["ahi"] + 4.5
    acromion = Ellipsoid((10.0, 8.0, zac), (24.0, 20.0, 4.5), power=(4, 4, 2), rot=rotation("y", A["acromion_tilt"]))
    clavicle = Tube([(-22.0, -16.0, zac + 2.0), (-60.0, -24.0, zac + 6.0), (-110.0, -30.0, zac + 2.0)], (8.0, 8.0))
    coracoid = Ellipsoid((-24.0, -30.0, 6.0), (14.0, 7.0, 7.0), rot=rotation("z", 20.0))
    bones = (
        ("humerus", hum, hum_in),
        (
            "glenoid",
            SmoothUnion((Ellipsoid((-R - gap - 6.0, 0.0, -3.0), (12.0, 14.0, 19.0)), scap_neck), 2) - cup,
            SmoothUnion(
                (Ellipsoid((-R - gap - 6.0, 0.0, -3.0), (12.0 - ct, 14.0 - ct, 19.0 - ct)), scap_neck.grown(-ct)), 2
            )
            - cup.grown(ct),
        ),
        ("scapula", scap_body, scap_body.grown(-1.2)),
        ("scapular_spine", spine, Tube(spine.points, (2.6, 4.4), up=(0, 1, 0))),
        ("acromion", acromion, acromion.grown(-ct)),
        ("clavicle", clavicle, Tube(clavicle.points, (8.0 - 1.5, 8.0 - 1.5))),
        ("coracoid", coracoid, coracoid.grown(-ct)),
    )
    for name, outer, inn in bones:
        grp = "scapula" if name in ("glenoid", "scapula", "scapular_spine", "coracoid") else name
        S.append(Structure(f"{name}_cortex", "cortex", outer, group=grp))
        S.append(Structure(f"{name}_marrow", "marrow", inn, group=grp))
    return S, info

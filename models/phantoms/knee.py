"""Knee phantom (default: sagittal PD fat-sat).

Anatomy frame (mm): origin at the centre of the tibial plateau, x towards MEDIAL, y towards
posterior, z towards superior. A right knee maps x to patient left (LPS +x); a left knee is
mirrored. Structures: limb (skin, subcutaneous fat, muscle), popliteal fat and vessels,
Hoffa and prefemoral fat pads, joint fluid and effusion, quadriceps and patellar tendons,
femur / tibia / patella / fibula (cortex + marrow), femoral, tibial and patellar cartilage,
medial (C-shaped) and lateral (O-shaped) menisci with a wedge cross-section, ACL and PCL.
Lesions: ACL discontinuity with fluid signal (partial: part of the cross-section over a short
gap; complete: full gap, drooping distal stump) and a meniscal tear line reaching an
articular surface. Mimics (any label): intraligamentous and intrameniscal signal that does
not interrupt fibres / reach a surface.
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
    Rod,
    SmoothUnion,
    Structure,
    Transformed,
    Tube,
    Union,
    rotation,
)
from models.phantoms.spec import GENERATOR_VERSION, KneeSpec

LABEL_KEYS = {"acl", "meniscus_tear", "meniscus_side", "laterality", "flexion"}  # handled here, not nuisances
ACL_CLASSES = ("intact", "partial", "complete")


def _jit(rng, base, rel=0.06):
    base = np.asarray(base, float)
    return base * (1.0 + rng.uniform(-rel, rel, size=base.shape))


def _draw_anatomy(rng) -> dict[str, Any]:
    a = {}
    a["limb_r"] = _jit(rng, (54.0, 56.0))
    a["limb_cy"] = 2.0
    a["skin"] = 1.5
    a["subcut"] = float(rng.uniform(3.0, 12.0))
    a["cond_med"] = _jit(rng, (15.0, 29.0, 22.0))
    a["cond_lat"] = _jit(rng, (15.0, 27.0, 22.0))
    a["fem_cart"] = float(rng.uniform(1.9, 2.6))
    a["tib_cart"] = float(rng.uniform(1.7, 2.4))
    a["pat_cart"] = float(rng.uniform(2.6, 3.6))
    a["cortex"] = float(rng.uniform(1.2, 1.8))
    a["patella"] = _jit(rng, (21.0, 10.0, 19.0))
    a["acl_r"] = _jit(rng, (5.0, 3.1), 0.1)
    a["pcl_r"] = _jit(rng, (6.0, 4.0), 0.1)
    a["men_h"] = _jit(rng, (5.0, 6.5), 0.1)  # (anterior, posterior) height
    a["fluid_rim"] = float(rng.uniform(0.3, 1.5))
    a["notch_y"] = float(rng.uniform(-2.0, 2.0))
    a["septa"] = fat_septa(rng, 6, (-40.0, -45.0, -70.0), (40.0, 50.0, 70.0))
    return a


def _flexion(rng, spec: KneeSpec) -> float:
    return uniform(rng, spec.flexion_deg)


def _meniscus_fn(cx, cy, rx, ry, rin_ant, rin_post, h_ant, h_post, z0, side, gap_half_deg, *, tear=None, core=None):
    """Inside-function of a meniscus (wedge cross-section ring), optionally restricted to a tear
    line or an intrasubstance core. ``side`` = +1 medial, -1 lateral (the notch is towards -side)."""
    cos_gap = np.cos(np.deg2rad(gap_half_deg))

    def fn(c):
        x, y, z = c.x, c.y, c.z
        dx = (x - np.float32(cx)) * np.float32(side / rx)
        dy = (y - np.float32(cy)) * np.float32(1.0 / ry)
        rho = np.sqrt(dx * dx + dy * dy) + np.float32(1e-6)
        pw = dy / rho * 0.5 + 0.5  # 0 anterior .. 1 posterior
        rin = rin_ant + (rin_post - rin_ant) * pw
        h = h_ant + (h_post - h_ant) * pw
        frac = (rho - rin) / (1.0 - rin)
        zt = z0 + h * (0.12 + 0.88 * frac)
        m = (rho <= 1.0) & (frac >= 0.0) & (z >= z0) & (z <= zt)
        m &= (-dx / rho) < cos_gap  # C / O opening towards the notch
        if tear is not None:
            m &= tear(dx, dy, rho, frac, z - np.float32(z0), zt - np.float32(z0), rin)
        if core is not None:
            m &= core(dx, dy, rho, frac, z - np.float32(z0), zt - np.float32(z0), rin)
        return m

    lo = (cx - rx - 1, cy - ry - 1, z0 - 1)
    hi = (cx + rx + 1, cy + ry + 1, z0 + max(h_ant, h_post) + 1)
    return fn, lo, hi


def _angle_window(theta_c, half_width):
    """Mask factory for the angular window of a meniscus (angle 0 = periphery, +90 = posterior)."""
    c, s = np.cos(theta_c), np.sin(theta_c)
    cw = np.cos(half_width)

    def win(dx, dy, rho):
        return (dx * np.float32(c) + dy * np.float32(s)) / rho >= cw

    return win


def generate_knee(seed: int, spec: KneeSpec, overrides: dict[str, Any]) -> Phantom:
    st = Streams("knee", seed)
    # ---- labels (own stream) then overrides
    acl = choice(st.labels, spec.acl_probs)
    men_tear = bool(st.labels.uniform() < spec.meniscus_tear_prob)
    men_side = "medial" if st.labels.uniform() < spec.meniscus_medial_share else "lateral"
    laterality = "R" if st.labels.uniform() < 0.5 else "L"
    if "acl" in overrides:
        acl = overrides["acl"]
        if acl not in ACL_CLASSES:
            raise PhantomError(f"acl must be one of {ACL_CLASSES}, got {acl!r}")
    if "meniscus_tear" in overrides:
        men_tear = bool(overrides["meniscus_tear"])
    if "meniscus_side" in overrides and overrides["meniscus_side"] is not None:
        men_side = overrides["meniscus_side"]
        if men_side not in ("medial", "lateral"):
            raise PhantomError(f"meniscus_side must be 'medial' or 'lateral', got {men_side!r}")
        if "meniscus_tear" not in overrides:
            men_tear = True
    if "laterality" in overrides:
        laterality = overrides["laterality"]
        if laterality not in ("R", "L"):
            raise PhantomError("laterality must be 'R' or 'L'")

    # ---- anatomy, lesion and acquisition draws (each its own stream, fixed order)
    A = _draw_anatomy(st.anatomy)
    A["flexion"] = _flexion(st.anatomy, spec)
    if "flexion" in overrides:
        A["flexion"] = float(overrides["flexion"])
    L = st.lesion
    les = dict(
        acl_pos=uniform(L, spec.acl_tear_position),
        acl_partial_gap=uniform(L, spec.acl_partial_gap_mm),
        acl_partial_frac=uniform(L, spec.acl_partial_fraction),
        acl_partial_dir=float(L.uniform(0, 2 * np.pi)),
        acl_complete_gap=uniform(L, spec.acl_complete_gap_mm),
        acl_droop=uniform(L, spec.acl_stump_droop_deg),
        acl_contrast=uniform(L, spec.acl_lesion_contrast),
        acl_mimic=bool(L.uniform() < spec.acl_mimic_prob),
        acl_mimic_pos=float(L.uniform(0.2, 0.8)),
        acl_mimic_len=float(L.uniform(6.0, 15.0)),
        acl_mimic_contrast=uniform(L, spec.acl_mimic_contrast),
        men_region=choice(L, {"posterior": 0.7, "body": 0.15, "anterior": 0.15}),
        men_type=choice(L, {"oblique_inferior": 0.35, "oblique_superior": 0.15, "horizontal": 0.3, "vertical": 0.2}),
        men_angle_jit=float(L.uniform(-15.0, 15.0)),
        men_len=uniform(L, spec.meniscus_tear_length_mm),
        men_width=uniform(L, spec.meniscus_tear_width_mm),
        men_q=float(L.uniform(0.25, 0.75)),
        men_zeta=float(L.uniform(0.35, 0.65)),
        men_phi=float(L.uniform(20.0, 55.0)),
        men_contrast=uniform(L, spec.meniscus_lesion_contrast),
        men_mimic=bool(L.uniform() < spec.meniscus_mimic_prob),
        men_mimic_side=("medial" if L.uniform() < 0.6 else "lateral"),
        men_mimic_angle=float(L.uniform(40.0, 130.0)),
        men_mimic_contrast=uniform(L, spec.meniscus_mimic_contrast),
        effusion=uniform(L, spec.effusion_mm),  # effusion is a nuisance; drawn here for a stable stream
        baker=bool(L.uniform() < spec.baker_cyst_prob),
    )
    n = draw_nuisances(st.acquisition, spec.acquisition)
    n["orientation"] = "sagittal"
    n["laterality"] = laterality
    apply_overrides(n, overrides, LABEL_KEYS)
    plane = n["orientation"]

    mirror = (1.0, 1.0, 1.0) if n["laterality"] == "R" else (-1.0, 1.0, 1.0)
    geom = make_geometry(n, plane=plane, center=(0.0, 3.0, 8.0), mirror=mirror, spec_slices=spec.acquisition.n_slices)
    structures, acl_info, men_info = _structures(A, les, acl, men_tear, men_side)
    rendered = render(structures, geom, n, st, lesion_groups=("acl_lesion", "meniscus_lesion"))

    # ---- labels with lesion / structure centres
    labels: dict[str, Any] = {
        "acl": acl,
        "acl_tear": int(acl != "intact"),
        "meniscus_tear": int(men_tear),
        "meniscus_side": men_side if men_tear else None,
        "laterality": n["laterality"],
    }
    centres_vox, centres_mm, struct_vox, struct_mm = {}, {}, {}, {}
    acl_mid = geom.index_of_anatomy(acl_info["centre"])
    struct_vox["acl"], struct_mm["acl"] = vox_and_mm(geom, acl_mid)
    if acl != "intact":
        c = centre_of(rendered.masks["acl_lesion"])
        kji = c if c is not None else geom.index_of_anatomy(acl_info["lesion"])
        centres_vox["acl"], centres_mm["acl"] = vox_and_mm(geom, kji)
    for side in ("medial", "lateral"):
        struct_vox[f"meniscus_{side}"], struct_mm[f"meniscus_{side}"] = vox_and_mm(
            geom, geom.index_of_anatomy(men_info[side])
        )
    if men_tear:
        c = centre_of(rendered.masks["meniscus_lesion"])
        kji = c if c is not None else geom.index_of_anatomy(men_info["lesion"])
        centres_vox["meniscus"], centres_mm["meniscus"] = vox_and_mm(geom, kji)
    labels["lesion_centers_vox"] = centres_vox
    labels["lesion_centers_mm"] = centres_mm
    labels["structure_centers_vox"] = struct_vox
    labels["structure_centers_mm"] = struct_mm

    study, series, frame = series_uids("knee", seed, n, plane)
    volume = geom.volume(
        rendered.array,
        study_uid=study,
        series_uid=series,
        frame_of_reference_uid=frame,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        modality="MR",
        body_part="KNEE",
        laterality=n["laterality"],
        attributes={
            "sequence": n["sequence"],
            "orientation": plane,
            "slice_thickness": geom.slice_thickness,
            "phantom_seed": seed,
            "phantom_generator": GENERATOR_VERSION,
        },
    )
    params = dict(n)
    params["flexion"] = A["flexion"]
    params.update({f"lesion_{k}": v for k, v in les.items()})
    return Phantom(anatomy="knee", seed=seed, volume=volume, labels=labels, masks=rendered.masks, params=params)


def _structures(A, les, acl: str, men_tear: bool, men_side: str):
    S: list[Structure] = []
    # knee flexion: tibia, fibula, menisci and the tibial ends of ligaments/tendon rotate about the
    # centre of the femoral condyles (the distal tibia swings posteriorly)
    pivot = np.array([0.0, 8.0, 27.0])
    flex = rotation("x", A["flexion"])

    def tib_shape(shape):
        return Transformed(shape, flex, pivot)

    def tib_point(pt):
        return pivot + flex @ (np.asarray(pt, float) - pivot)

    lr = A["limb_r"]
    cy = A["limb_cy"]
    # --- limb layers
    limb = Ellipsoid((0, cy, 0), (lr[0], lr[1], 1e3))
    S.append(Structure("skin", "skin", limb, group="soft_tissue"))
    S.append(Structure("subcutaneous_fat", "fat", Layer(limb, A["skin"], float(lr.mean())), group="soft_tissue"))
    S.append(Structure("muscle", "muscle", Layer(limb, A["skin"] + A["subcut"], float(lr.mean())), group="soft_tissue"))
    inner = ("muscle",)
    for c, radii, rot in A["septa"]:
        S.append(Structure("septum", "fat", Ellipsoid(c, radii, rot=rot), over=inner, group="soft_tissue"))
    S.append(Structure("popliteal_fat", "fat", Ellipsoid((0, 36, 2), (26, 14, 45)), over=inner, group="soft_tissue"))
    S.append(
        Structure(
            "popliteal_artery",
            "artery",
            Tube([(-3, 42, -80), (-2, 40, 0), (-4, 41, 80)], (3.0, 3.0)),
            group="soft_tissue",
        )
    )
    S.append(
        Structure(
            "popliteal_vein", "vein", Tube([(4, 44, -80), (5, 43, 0), (3, 44, 80)], (3.8, 3.8)), group="soft_tissue"
        )
    )
    S.append(
        Structure(
            "hoffa_fat",
            "fat",
            Ellipsoid((0, -26, 7), (24, 12, 13)),
            over=inner + ("subcutaneous_fat",),
            group="soft_tissue",
        )
    )
    S.append(Structure("prefemoral_fat", "fat", Ellipsoid((0, -27, 52), (20, 7, 14)), over=inner, group="soft_tissue"))
    # --- joint fluid: effusion in the suprapatellar recess, thin rim around the articular surfaces
    eff = les["effusion"]
    S.append(
        Structure(
            "effusion",
            "fluid",
            Ellipsoid((0, -30, 50), (26, 1.0 + eff, 22)),
            over=inner + ("prefemoral_fat",),
            group="joint_fluid",
        )
    )
    rim = A["fluid_rim"]
    cm = Ellipsoid((21, 8, 27), A["cond_med"])
    cl = Ellipsoid((-21, 6, 27), A["cond_lat"])
    # articular part of the condyles: inferior and posterior surfaces
    artic = HalfSpace((0, 8, 33), (0, -0.6, 1))
    S.append(
        Structure(
            "joint_fluid",
            "fluid",
            Intersection(
                (
                    Union((cm.grown(A["fem_cart"] + rim), cl.grown(A["fem_cart"] + rim))),
                    HalfSpace((0, 8, 36), (0, -0.6, 1)),
                )
            ),
            over=inner + ("popliteal_fat", "hoffa_fat"),
            group="joint_fluid",
        )
    )
    if les["baker"]:
        S.append(Structure("baker_cyst", "fluid", Ellipsoid((14, 44, 0), (8, 6, 16)), group="joint_fluid"))
    # --- tendons
    S.append(
        Structure(
            "quadriceps_tendon",
            "tendon",
            Tube([(0, -40, 50), (0, -33, 75), (0, -28, 110)], (14.0, 2.6)),
            group="tendon",
        )
    )
    S.append(
        Structure(
            "patellar_tendon",
            "tendon",
            Tube([(0, -45, 18), tib_point((0, -36, -8)), tib_point((0, -28, -30))], (12.0, 2.4)),
            group="tendon",
        )
    )
    # --- intercondylar notch (synovium / fat around the cruciates)
    notch = Ellipsoid((0, 24 + A["notch_y"], 10), (9.5, 22, 21), power=(4, 2, 2))
    S.append(
        Structure("notch", "synovium", Intersection((notch, HalfSpace((0, 0, 0), (0, 0, -1)))), group="soft_tissue")
    )
    # --- tibial cartilage (bone painted later covers the inside)
    tib = Ellipsoid((0, 3, -24), (38, 27, 24), power=(4, 2, 6))
    S.append(
        Structure(
            "tibial_cartilage",
            "cartilage",
            tib_shape(
                Intersection(
                    (
                        tib.grown(A["tib_cart"]),
                        HalfSpace((0, 0, -3), (0, 0, -1)),
                        Func(lambda c: np.abs(c.x) > 7.0, (-60, -60, -60), (60, 60, 60)),
                    )
                )
            ),
            group="cartilage",
        )
    )
    # --- menisci
    men = {}
    geo = {
        "medial": dict(cx=20.0, cy=4.0, rx=15.0, ry=20.0, rin_ant=0.62, rin_post=0.45, side=1.0, gap=28.0),
        "lateral": dict(cx=-20.0, cy=4.0, rx=14.0, ry=17.0, rin_ant=0.55, rin_post=0.55, side=-1.0, gap=14.0),
    }
    h_ant, h_post = A["men_h"]
    z0 = 0.8
    for side, g in geo.items():
        fn, lo, hi = _meniscus_fn(
            g["cx"], g["cy"], g["rx"], g["ry"], g["rin_ant"], g["rin_post"], h_ant, h_post, z0, g["side"], g["gap"]
        )
        S.append(Structure(f"meniscus_{side}", "fibrocartilage", tib_shape(Func(fn, lo, hi)), group=f"meniscus_{side}"))
        # centre of the posterior horn (structure centre reported for negatives)
        rmid = (g["rin_post"] + 1) / 2
        men[side] = tib_point((g["cx"], g["cy"] + g["ry"] * rmid, z0 + h_post * 0.4))
    # meniscal mimic: intrasubstance globular signal, never reaching a surface
    if les["men_mimic"]:
        g = geo[les["men_mimic_side"]]
        th = np.deg2rad(les["men_mimic_angle"])
        win = _angle_window(th, 0.18)

        def core(dx, dy, rho, frac, zl, hl, rin):
            return win(dx, dy, rho) & (frac > 0.35) & (frac < 0.8) & (zl > 0.3 * hl) & (zl < 0.65 * hl)

        fn, lo, hi = _meniscus_fn(
            g["cx"],
            g["cy"],
            g["rx"],
            g["ry"],
            g["rin_ant"],
            g["rin_post"],
            h_ant,
            h_post,
            z0,
            g["side"],
            g["gap"],
            core=core,
        )
        S.append(
            Structure(
                "meniscus_mimic",
                "lesion",
                tib_shape(Func(fn, lo, hi)),
                over=(f"meniscus_{les['men_mimic_side']}",),
                group=f"meniscus_{les['men_mimic_side']}",
                extra={"contrast": les["men_mimic_contrast"], "texture": 2.0},
            )
        )
    # meniscal tear: a bright line reaching an articular surface
    men_lesion_point = None
    if men_tear:
        g = geo[men_side]
        base_angle = {"posterior": 90.0, "body": 10.0, "anterior": -90.0}[les["men_region"]]
        th = np.deg2rad(base_angle + les["men_angle_jit"])
        r_mm = 0.5 * (g["rx"] + g["ry"]) * 0.8
        win = _angle_window(th, 0.5 * les["men_len"] / r_mm)
        width = les["men_width"]
        kind = les["men_type"]
        q0, zeta, phi = les["men_q"], les["men_zeta"], np.deg2rad(les["men_phi"])
        r_w = 0.5 * (g["rx"] + g["ry"])  # mm per unit of normalized radius

        def tear(dx, dy, rho, frac, zl, hl, rin, _win=win, _kind=kind):
            w = _win(dx, dy, rho)
            rl = (rho - rin) * np.float32(r_w)  # mm from the free edge, outwards
            if _kind == "horizontal":  # cleavage from the free edge at mid height
                line = np.abs(zl - zeta * hl) <= width / 2
                return w & line & (frac <= 0.55 + 0.4 * q0)
            width_r = (1.0 - rin) * np.float32(r_w)
            if _kind == "vertical":  # longitudinal vertical: both surfaces
                return w & (np.abs(rl - q0 * width_r) <= width / 2)
            # oblique: from the inferior (or superior) surface at q0, inclined by phi, to the other surface
            zz = zl if _kind == "oblique_inferior" else (hl - zl)
            x0 = q0 * width_r
            d = (rl - x0) * np.float32(np.cos(phi)) - zz * np.float32(np.sin(phi))
            return w & (np.abs(d) <= width / 2) & (zz <= 0.85 * hl)

        fn, lo, hi = _meniscus_fn(
            g["cx"],
            g["cy"],
            g["rx"],
            g["ry"],
            g["rin_ant"],
            g["rin_post"],
            h_ant,
            h_post,
            z0,
            g["side"],
            g["gap"],
            tear=tear,
        )
        S.append(
            Structure(
                "meniscus_tear",
                "lesion",
                tib_shape(Func(fn, lo, hi)),
                over=(f"meniscus_{men_side}", "meniscus_mimic"),
                group="meniscus_lesion",
                extra={"contrast": les["men_contrast"]},
            )
        )
        rin = g["rin_ant"] + (g["rin_post"] - g["rin_ant"]) * (0.5 + 0.5 * np.sin(th))
        rho = rin + (1 - rin) * 0.6
        men_lesion_point = tib_point(
            (
                g["cx"] + g["side"] * g["rx"] * rho * np.cos(th),
                g["cy"] + g["ry"] * rho * np.sin(th),
                z0 + 0.3 * (h_ant + h_post) / 2,
            )
        )
    men["lesion"] = men_lesion_point

    # --- femoral and patellar cartilage (bone painted next covers the inside)
    troch = Ellipsoid((0, -4, 40), (33, 19, 22))
    notch_cut = notch.grown(1.0)
    troch_art = Intersection(
        (
            troch.grown(A["fem_cart"]),
            HalfSpace((0, -10, 0), (0, 1, 0)),
            HalfSpace((0, 0, 18), (0, 0, -1)),
            HalfSpace((0, 0, 56), (0, 0, 1)),
        )
    )
    cart = (
        Union((Intersection((Union((cm.grown(A["fem_cart"]), cl.grown(A["fem_cart"]))), artic)), troch_art)) - notch_cut
    )
    S.append(Structure("femoral_cartilage", "cartilage", cart, group="cartilage"))
    pat_c = np.array([0.0, -38.5, 38.0])
    pat = Ellipsoid(pat_c, A["patella"])
    S.append(
        Structure(
            "patellar_cartilage",
            "cartilage",
            Intersection((pat.grown(A["pat_cart"]), HalfSpace(pat_c + (0, 2.0, 0), (0, -1, 0)))),
            group="cartilage",
        )
    )
    # --- cruciate ligaments
    pcl = Tube([(7, 2, 17), (4, 13, 24), (2, 25, 15), tib_point((1, 30, -9))], tuple(A["pcl_r"]), up=(1, 0, 0))
    S.append(Structure("pcl", "ligament", pcl, group="pcl"))
    fem = np.array([-7.0, 19.0 + A["notch_y"], 22.0])
    tibp = tib_point((-1.0, -7.0, 1.5))
    acl_tube = Tube([fem, tibp], tuple(A["acl_r"]), up=(1, 0, 0))
    length = acl_tube.length
    s_t = les["acl_pos"] * length
    acl_info = {"centre": acl_tube.point_at(length / 2), "lesion": acl_tube.point_at(s_t)}
    r_a, r_b = A["acl_r"]
    if acl == "complete":
        gap = les["acl_complete_gap"]
        s0, s1 = max(s_t - gap / 2, 3.0), min(s_t + gap / 2, length - 3.0)
        p0, p1 = acl_tube.point_at(s0), acl_tube.point_at(s1)
        # distal stump droops: rotate its free end about the tibial footprint (sagittal plane)
        t = np.deg2rad(les["acl_droop"])
        v = p1 - tibp
        rot = np.array([[1, 0, 0], [0, np.cos(t), np.sin(t)], [0, -np.sin(t), np.cos(t)]])
        p1r = tibp + rot @ v
        # stumps end square at the gap (the femoral / tibial ends are inside bone anyway)
        S.append(
            Structure(
                "acl_proximal", "ligament", Tube([fem, p0], (r_a, r_b), up=(1, 0, 0), flat_ends=True), group="acl"
            )
        )
        S.append(
            Structure(
                "acl_distal", "ligament", Tube([p1r, tibp], (r_a, r_b), up=(1, 0, 0), flat_ends=True), group="acl"
            )
        )
        gap_tube = Tube([p0, p1r], (r_a * 1.15, r_b * 1.25), up=(1, 0, 0))
        S.append(
            Structure(
                "acl_tear",
                "lesion",
                gap_tube,
                over=("notch", "muscle", "hoffa_fat", "joint_fluid"),
                group="acl_lesion",
                extra={"contrast": les["acl_contrast"]},
            )
        )
        acl_info["lesion"] = 0.5 * (p0 + p1r)
    else:
        S.append(Structure("acl", "ligament", acl_tube, group="acl"))
    if les["acl_mimic"]:
        sm, half = les["acl_mimic_pos"] * length, les["acl_mimic_len"] / 2

        def mimic(c, _t=acl_tube, _sm=sm, _h=half):
            lev, s, _a, _b = _t.param(c)
            return (lev <= 0.3) & (np.abs(s - _sm) <= _h)

        S.append(
            Structure(
                "acl_mimic",
                "lesion",
                Func(mimic, acl_tube.lo, acl_tube.hi),
                over=("acl", "acl_proximal", "acl_distal"),
                group="acl",
                extra={"contrast": les["acl_mimic_contrast"], "texture": 2.0},
            )
        )
    if acl == "partial":
        gap = les["acl_partial_gap"]
        frac = les["acl_partial_frac"]
        ca, sa = np.cos(les["acl_partial_dir"]), np.sin(les["acl_partial_dir"])

        def partial(c, _t=acl_tube, _s=s_t, _g=gap, _f=frac, _ca=ca, _sa=sa):
            lev, s, a, b = _t.param(c)
            c = (a / np.float32(r_a)) * np.float32(_ca) + (b / np.float32(r_b)) * np.float32(_sa)
            return (lev <= 1.0) & (np.abs(s - _s) <= _g / 2) & (c >= 1.0 - 2.0 * _f)

        S.append(
            Structure(
                "acl_tear",
                "lesion",
                Func(partial, acl_tube.lo, acl_tube.hi),
                over=("acl", "acl_mimic"),
                group="acl_lesion",
                extra={"contrast": les["acl_contrast"]},
            )
        )

    # --- bones: cortex (outer) then marrow (inner)
    ct = A["cortex"]
    meta = Ellipsoid((0, 5, 58), (30, 22, 30))
    shaft = Rod((0, 4, 62), (0, 0, 1), (15.0, 14.0), 400.0, cap=22.0)
    fem_parts = (cm, cl, troch, meta, shaft)
    femur_outer = SmoothUnion(fem_parts, 2) - notch
    femur_inner = SmoothUnion(
        tuple(p.grown(-ct) for p in fem_parts[:3]) + (meta.grown(-2.5), shaft.grown(-3.5)), 2
    ) - notch.grown(ct)
    tib_shaft = Rod((0, 6, -34), (0, 0, -1), (16.0, 15.0), 400.0, cap=18.0)
    spines = (Ellipsoid((4, 2, 0), (3.5, 7, 7.5)), Ellipsoid((-5, 3, 0), (3.5, 7, 6.5)))
    tuber = Ellipsoid((0, -20, -32), (13, 8, 12))
    tibia_outer = tib_shape(Union((SmoothUnion((tib, tib_shaft, tuber), 2),) + spines))
    tibia_inner = tib_shape(SmoothUnion((tib.grown(-ct), tib_shaft.grown(-3.5), tuber.grown(-ct)), 2))
    fib_shaft = Rod((-34, 21, -34), (0, 0, -1), (7.0, 7.0), 400.0, cap=6.0)
    fib = tib_shape(SmoothUnion((Ellipsoid((-33, 20, -26), (9, 9, 12)), fib_shaft), 2))
    fib_in = tib_shape(SmoothUnion((Ellipsoid((-33, 20, -26), (9 - ct, 9 - ct, 12 - ct)), fib_shaft.grown(-2.5)), 2))
    for name, outer, inn in (
        ("femur", femur_outer, femur_inner),
        ("tibia", tibia_outer, tibia_inner),
        ("patella", pat, pat.grown(-ct)),
        ("fibula", fib, fib_in),
    ):
        S.append(Structure(f"{name}_cortex", "cortex", outer, group=name))
        S.append(Structure(f"{name}_marrow", "marrow", inn, group=name))
    return S, acl_info, men

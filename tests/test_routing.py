"""Routing rules: the shipped vendor table, validation, reload, own objects, rule conditions."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest

from node.errors import RoutingError
from node.intake.routing import (
    PIPELINE_ROLES,
    TABLE_HEADER_KEYS,
    RulesFile,
    SeriesFacts,
    explain,
    facts_from_table_entry,
    load_rules,
    parse_rules,
)
from node.settings import DEFAULT_ROUTING_RULES, DEFAULT_UID_ROOT

pytestmark = pytest.mark.unit

VENDOR_TABLE = Path(__file__).resolve().parent.parent / "node" / "intake" / "vendor_series.toml"
ENTRIES = tomllib.loads(VENDOR_TABLE.read_text())["series"]


@pytest.fixture(scope="module")
def shipped():
    return load_rules(DEFAULT_ROUTING_RULES)


def facts(description, body_part="KNEE", **kw) -> SeriesFacts:
    return SeriesFacts(
        series_uid=kw.pop("series_uid", "1.2.3.4"),
        modality=kw.pop("modality", "MR"),
        body_part=body_part,
        series_description=description,
        **kw,
    )


def outcome(route) -> str:
    return f"{route.pipeline}/{route.role}" if route.pipeline else "unrouted"


@pytest.mark.parametrize(
    "entry", ENTRIES, ids=[f"{e['vendor']}:{e['description']}:{e.get('body_part', '')}" for e in ENTRIES]
)
def test_vendor_series_table(shipped, entry):
    f = facts_from_table_entry(entry, series_uid="1.2.840.113619.2.1")
    ex = explain(f, shipped, uid_root=DEFAULT_UID_ROOT)
    route = ex.route
    why = (route.rule, ex.plane, ex.contrast, ex.anatomy, ex.flags)
    assert outcome(route) == entry["expect"], why
    if "expect_plane" in entry:
        assert ex.plane.value == entry["expect_plane"], why
    if "expect_contrast" in entry:
        assert ex.contrast.value == entry["expect_contrast"], why
    for flag in entry.get("expect_flags", []):
        assert flag in ex.flags, why
    if is_header_row(entry):  # what the scanner measured decided, not the text
        if "expect_plane" in entry and entry["expect_plane"] in ("sagittal", "coronal", "axial", "multi"):
            assert ex.plane.source == "ImageOrientationPatient", why
        if "expect_contrast" in entry and not entry.get("description", "").strip():
            assert ex.contrast.source.startswith("acquisition parameters"), why


def is_header_row(entry) -> bool:
    return any(k in entry for k in TABLE_HEADER_KEYS)


HEADER_ROWS = [e for e in ENTRIES if is_header_row(e)]


def test_header_only_rows_cover_every_vendor_and_what_never_becomes_model_input():
    """Descriptions without plane or contrast, from every vendor; localizers, calibration, Dixon F/IP/OP,
    maps and reformats, post-contrast and a cervical spine."""
    assert {"Siemens", "GE", "Philips", "Canon"} <= {e["vendor"] for e in HEADER_ROWS}
    for vendor, description in [
        ("Philips", "T2W_TSE"),
        ("Philips", "PDW_SPAIR"),
        ("Philips", "T1W_aTSE"),
        ("GE", "FSE-XL"),
        ("GE", "Sag FSE"),
        ("Siemens", "KNIE ROUTINE 3"),
    ]:
        assert any(
            e["vendor"] == vendor and e["description"] == description and e["expect"] != "unrouted" for e in HEADER_ROWS
        ), (vendor, description)
    flags = {f for e in HEADER_ROWS for f in e.get("expect_flags", [])}
    assert {
        "localizer",
        "calibration",
        "dixon_fat",
        "dixon_in_phase",
        "dixon_opposed_phase",
        "derived",
        "mpr",
        "post_contrast",
    } <= flags
    for e in HEADER_ROWS:
        if {"localizer"} & set(e.get("expect_flags", [])):
            assert e["expect"].endswith("/localizer")
        elif set(e.get("expect_flags", [])) - {"dixon", "dixon_water"}:
            assert e["expect"] == "unrouted", e
    cervical = [
        e
        for e in HEADER_ROWS
        if "122494005" in str(e.get("anatomic_region"))
        or e.get("body_part") == "CSPINE"
        or "spine" in e.get("description", "").lower()
    ]
    assert len(cervical) >= 3 and all(
        not e["expect"].startswith("lumbar_spine") for e in cervical if "122496007" not in str(e.get("anatomic_region"))
    )


def test_vendor_table_covers_every_vendor_role_and_localizers():
    vendors = {e["vendor"] for e in ENTRIES}
    assert {"Siemens", "GE", "Philips", "Canon"} <= vendors
    expected = {e["expect"] for e in ENTRIES}
    for pipeline, roles in PIPELINE_ROLES.items():
        for role in roles:
            assert f"{pipeline}/{role}" in expected, f"no vendor example for {pipeline}/{role}"
    localizers = [e for e in ENTRIES if e["expect"].endswith("/localizer")]
    assert len(localizers) >= 8
    assert any(e.get("body_part") == "" and e["expect"] != "unrouted" for e in ENTRIES)
    # the phantom descriptions of contract C3
    for desc, body, expect in [
        ("SAG PD FS", "KNEE", "knee/sag_fluid"),
        ("COR OBL T2 FS", "SHOULDER", "shoulder/cor_fluid"),
        ("SAG T2 TSE", "LSPINE", "lumbar_spine/sag_t2"),
        ("3-PLANE LOC", "KNEE", "knee/localizer"),
    ]:
        assert any(e["description"] == desc and e.get("body_part") == body and e["expect"] == expect for e in ENTRIES)


def test_localizers_are_routed_but_never_model_input(shipped):
    for desc in ("localizer", "3-pl loc", "3 Plane Loc", "Survey", "SCOUT", "AAHead_Scout", "3-PLANE LOC", "Locator"):
        route = shipped.route(facts(desc), uid_root=DEFAULT_UID_ROOT)
        assert (route.pipeline, route.role) == ("knee", "localizer"), desc
        assert route.routed and not route.is_model_input


def test_own_objects_are_never_routed(shipped):
    for f in (
        facts("SAG PD FS", own_object=True),
        facts("SAG PD FS", series_uid=DEFAULT_UID_ROOT + "1.2.3"),
        facts("SAG PD FS", manufacturer="msknode"),
        facts("SAG PD FS", manufacturer="MSKNODE "),
    ):
        route = shipped.route(f, uid_root=DEFAULT_UID_ROOT)
        assert not route.routed and route.rule == "unrouted:own_object"
    # a site UID root works the same way
    site = "1.2.826.0.1.99."
    assert shipped.route(facts("SAG PD FS", series_uid=site + "7"), uid_root=site).rule == "unrouted:own_object"
    assert shipped.route(facts("SAG PD FS", series_uid="1.2.826.0.1.990.7"), uid_root=site).routed


def test_anatomy_from_the_other_series_of_the_study(shipped):
    loc = facts("3 Plane Loc", body_part="", series_uid="1.1")
    sag = facts("Sag PD FSE FS", body_part="KNEE", series_uid="1.2")
    assert shipped.route(loc, uid_root=DEFAULT_UID_ROOT).rule == "unrouted:no_anatomy"
    route = shipped.route(loc, uid_root=DEFAULT_UID_ROOT, siblings=[loc, sag])
    assert (route.pipeline, route.role, route.anatomy_source) == ("knee", "localizer", "other_series")
    # two anatomies among the other series: no guess
    cor = facts("Cor Obl T2 FS", body_part="SHOULDER", series_uid="1.3")
    assert not shipped.route(loc, uid_root=DEFAULT_UID_ROOT, siblings=[loc, sag, cor]).routed
    # our own objects are no evidence
    ours = facts("SAG PD FS", body_part="KNEE", series_uid="1.4", own_object=True)
    assert not shipped.route(loc, uid_root=DEFAULT_UID_ROOT, siblings=[loc, ours]).routed


def test_conditions_laterality_calling_ae_protocol_body_part_manufacturer():
    rules = parse_rules(
        r"""
        [anatomy.knee]
        body_part = 'knee'
        [[rule]]
        name = "left knees from the research scanner"
        pipeline = "knee"
        role = "sag_pd"
        anatomy = "any"
        calling_ae = ["RESEARCH_MR"]
        laterality = "L"
        protocol = 'study ?42'
        manufacturer = 'siemens'
        [[rule]]
        name = "CT is welcome too"
        pipeline = "knee"
        role = "sag_fluid"
        modality = ["CT", "MR"]
        body_part = '^knee$'
        description = ['\bsag', '\bfs\b']
        """
    )
    base = dict(
        series_uid="1.2",
        modality="MR",
        body_part="",
        series_description="whatever",
        protocol_name="STUDY_42",
        laterality="L",
        calling_ae="RESEARCH_MR",
        manufacturer="SIEMENS",
    )
    assert rules.route(SeriesFacts(**base), uid_root="9.9.").rule == "left knees from the research scanner"
    for change in ({"laterality": "R"}, {"calling_ae": "OTHER"}, {"protocol_name": "routine"}, {"manufacturer": "GE"}):
        assert not rules.route(SeriesFacts(**{**base, **change}), uid_root="9.9.").routed, change
    ct = SeriesFacts(series_uid="1.3", modality="CT", body_part="KNEE", series_description="sag_pd_fs")
    assert rules.route(ct, uid_root="9.9.").role == "sag_fluid"
    assert not rules.route(SeriesFacts(**{**ct.__dict__, "modality": "US"}), uid_root="9.9.").routed
    assert not rules.route(SeriesFacts(**{**ct.__dict__, "series_description": "sag pd"}), uid_root="9.9.").routed


def test_first_matching_rule_wins_and_route_false_stops():
    rules = parse_rules(
        """
        [anatomy.knee]
        body_part = 'knee'
        [[rule]]
        name = "no research series"
        route = false
        text = 'research'
        [[rule]]
        name = "everything sagittal"
        pipeline = "knee"
        role = "sag_pd"
        text = 'sag'
        [[rule]]
        name = "never reached"
        pipeline = "knee"
        role = "sag_fluid"
        text = 'sag'
        """
    )
    assert rules.route(facts("sag research"), uid_root="9.").rule == "unrouted:no research series"
    assert rules.route(facts("sag pd fs"), uid_root="9.").rule == "everything sagittal"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[rule]\n", "invalid TOML"),
        ('colour = 1\n[[rule]]\nname="a"\npipeline="knee"\nrole="sag_pd"', "unknown top-level key(s) ['colour']"),
        ("version = 2\n", "version 2 is not supported"),
        ("version = 1\n", "no [[rule]] entries"),
        ('[[rule]]\npipeline = "knee"\nrole = "sag_pd"', "rule 1: needs a name"),
        (
            '[[rule]]\nname = "x"\npipeline = "elbow"\nrole = "sag_pd"',
            "pipeline 'elbow' is not one of knee, lumbar_spine, shoulder",
        ),
        ('[[rule]]\nname = "x"\npipeline = "knee"\nrole = "sag_t2"', "role 'sag_t2' is not a role of knee"),
        (
            '[[rule]]\nname = "x"\npipeline = "knee"\nrole = "sag_pd"\nanatomy = "any"\ndescripton = "sag"',
            "rule 1 ('x'): unknown key(s) ['descripton']",
        ),
        (
            '[[rule]]\nname = "x"\npipeline = "knee"\nrole = "sag_pd"\nanatomy = "any"\ntext = "sag(("',
            "rule 1 ('x'): text: invalid regex 'sag(('",
        ),
        (
            '[[rule]]\nname = "x"\npipeline = "knee"\nrole = "sag_pd"\nanatomy = "any"\ntext = "{nope}"',
            "pattern {nope} is not defined in [patterns]",
        ),
        ('[[rule]]\nname = "x"\npipeline = "knee"\nrole = "sag_pd"', "anatomy 'knee' has no [anatomy.knee] table"),
        ('[[rule]]\nname = "x"\nroute = false\nrole = "sag_pd"', "a rule with route = false has no role"),
        ('[anatomy.elbow]\ntext = "elbow"\n[[rule]]\nname = "x"\nroute = false', "'elbow' is not a pipeline"),
        (
            '[[rule]]\nname = "x"\nroute = false\n[[rule]]\nname = "x"\nroute = false',
            "rule 2: the name 'x' is used twice",
        ),
        ('[[rule]]\nname = "x"\nroute = false\nlaterality = 3', "laterality must be a string or a non-empty list"),
        ('[patterns]\na = "x{b}"\n[[rule]]\nname = "x"\nroute = false', "patterns cannot nest"),
    ],
)
def test_invalid_rules_are_refused_with_a_clear_message(text, message):
    with pytest.raises(RoutingError) as e:
        parse_rules(text, source="site.toml")
    assert message in str(e.value)
    assert str(e.value).startswith("routing rules site.toml")


def test_missing_rules_file(tmp_path):
    with pytest.raises(RoutingError, match="file not found"):
        load_rules(tmp_path / "nope.toml")


def test_rules_file_is_reloaded_when_it_changes_and_an_invalid_file_is_refused(tmp_path, caplog):
    path = tmp_path / "rules.toml"
    text = DEFAULT_ROUTING_RULES.read_text()
    path.write_text(text)
    caplog.set_level(logging.INFO, logger="test.routing")
    rf = RulesFile(path, logging.getLogger("test.routing"))
    knee_sag_t2 = facts("SAG T2WI", body_part="KNEE")
    assert not rf.current().route(knee_sag_t2, uid_root="9.").routed

    def rewrite(new_text):
        path.write_text(new_text)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a visible mtime change

    extra = '\n[[rule]]\nname = "site: knee sagittal T2"\npipeline = "knee"\nrole = "sag_fluid"\ntext = [\'{sag}\', \'{t2}\']\n'
    rewrite(text + extra)
    assert rf.current().route(knee_sag_t2, uid_root="9.").rule == "site: knee sagittal T2"
    assert any("routing rules reloaded from" in r.getMessage() for r in caplog.records)

    caplog.clear()
    rewrite(text + extra + '\n[[rule]]\nname = "broken"\npipeline = "knee"\nrole = "sag_fluid"\ntext = "(("\n')
    current = rf.current()
    assert current.route(knee_sag_t2, uid_root="9.").rule == "site: knee sagittal T2"  # old rules stay
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert (
        len(errors) == 1
        and "invalid regex" in errors[0].getMessage()
        and "previous rules stay" in errors[0].getMessage()
    )
    assert "invalid regex" in rf.last_error
    rf.current()  # unchanged broken file: not logged again
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    path.unlink()  # a deleted file is refused as well
    assert rf.current() is current

    rewrite(text)
    assert not rf.current().route(knee_sag_t2, uid_root="9.").routed and rf.last_error is None


def test_first_load_of_an_invalid_file_fails(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "x"\npipeline = "knee"\n')
    with pytest.raises(RoutingError, match="role None is not a role of knee"):
        RulesFile(path)


# ---- the text rows again, as a scanner that writes no description would send them -----------------
_ORIENTATION = {"sagittal": "0\\1\\0\\0\\0\\-1", "coronal": "1\\0\\0\\0\\0\\-1", "axial": "1\\0\\0\\0\\1\\0"}
_PARAMETERS = {
    "pd": dict(scanning_sequence="SE", tr=3000.0, te=30.0),
    "pd_fs": dict(scanning_sequence="SE", scan_options="FS", tr=3000.0, te=30.0),
    "t1": dict(scanning_sequence="SE", tr=600.0, te=12.0),
    "t1_fs": dict(scanning_sequence="SE", scan_options="FS", tr=600.0, te=12.0),
    "t2": dict(scanning_sequence="SE", tr=3500.0, te=90.0),
    "t2_fs": dict(scanning_sequence="SE", scan_options="FS", tr=3500.0, te=80.0),
    "stir": dict(scanning_sequence="SE\\IR", tr=4500.0, te=40.0, ti=160.0),
    "gre": dict(scanning_sequence="GR", tr=500.0, te=15.0),
    "dess": dict(scanning_sequence="GR", sequence_name="*de3d1", tr=14.0, te=5.0),
}
TEXT_ROWS = [e for e in ENTRIES if not is_header_row(e) and e.get("modality", "MR") == "MR"]


@pytest.mark.parametrize(
    "entry", TEXT_ROWS, ids=[f"{e['vendor']}:{e['description']}:{e.get('body_part', '')}" for e in TEXT_ROWS]
)
def test_every_text_row_routes_the_same_from_its_headers_alone(shipped, entry):
    """The plane and contrast a description names, written as orientation and parameters with the description
    (and protocol name) removed: the same pipeline and role. Rows decided by a flag or by an anatomy only
    the description names are text-only by nature and are skipped."""
    text = explain(facts_from_table_entry(entry), shipped, uid_root=DEFAULT_UID_ROOT)
    if set(text.flags) - {"localizer", "dixon", "dixon_water"} or text.anatomy.source in (
        "SeriesDescription",
        "ProtocolName",
    ):
        pytest.skip("decided by what only the text says")
    header = {k: v for k, v in entry.items() if k not in ("description", "protocol")}
    header["description"] = ""
    if "localizer" in text.flags:
        header["orientations"] = [[o, 3] for o in _ORIENTATION.values()]
        header.update(scanning_sequence="GR", tr=8.0, te=4.0)
    else:
        if text.plane.value in _ORIENTATION:
            header["orientation"] = _ORIENTATION[text.plane.value]
        header.update(_PARAMETERS.get(text.contrast.value or "", {}))
        if "dixon_water" in text.flags:
            header["image_type"] = "DERIVED\\PRIMARY\\DIXON\\WATER"
    ex = explain(facts_from_table_entry(header), shipped, uid_root=DEFAULT_UID_ROOT)
    assert outcome(ex.route) == entry["expect"], (ex.summary(), text.summary())
    if text.plane.value in _ORIENTATION:
        assert ex.plane.source == "ImageOrientationPatient"

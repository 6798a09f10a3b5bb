"""``msknode series --json``: every series with the routing rule that matched and the explanation's summary."""

from __future__ import annotations

import json

import pytest

from node.cli import main
from node.commands.core import routing_summary
from node.intake.routing import explain, facts_from_table_entry, load_rules
from node.settings import DEFAULT_ROUTING_RULES, DEFAULT_UID_ROOT
from support.index_rows import make_series, make_study

pytestmark = pytest.mark.unit

KEYS = {
    "study_uid",
    "series_uid",
    "modality",
    "body_part",
    "series_description",
    "instances",
    "state",
    "pipeline",
    "role",
}


def test_series_json_names_the_matched_rule_and_the_explanation(settings, db, capsys):
    rules = load_rules(DEFAULT_ROUTING_RULES)
    ex = explain(
        facts_from_table_entry({"description": "t2_tse_fs_sag", "body_part": "KNEE"}), rules, uid_root=DEFAULT_UID_ROOT
    )
    assert ex.route.routed, ex.summary()
    with db.session() as s:
        st = make_study(s)
        routed = make_series(s, st, description="t2_tse_fs_sag")
        routed.state, routed.pipeline, routed.role = "complete", ex.route.pipeline, ex.route.role
        routed.routing_rule, routed.routing_explanation = ex.route.rule, ex.to_json()
        make_series(s, st, description="still arriving")
        s.commit()

    assert main(["series", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    assert all(set(r) >= KEYS for r in rows)  # the keys scripts already read
    first, second = rows
    assert first["routing_rule"] == ex.route.rule
    assert first["routing_summary"] == ex.summary()  # the same line as the log
    assert (second["routing_rule"], second["routing_summary"]) == (None, None)


def test_routing_summary_of_an_unrouted_series_names_why():
    rules = load_rules(DEFAULT_ROUTING_RULES)
    ex = explain(
        facts_from_table_entry({"description": "survey", "body_part": "HEAD"}), rules, uid_root=DEFAULT_UID_ROOT
    )
    assert routing_summary(ex.to_json()) == ex.summary()
    assert routing_summary(json.dumps(ex.to_json())) == ex.summary()
    assert routing_summary(None) is None

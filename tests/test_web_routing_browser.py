"""Making a routing rule in a real headless Chromium (as tests/test_web_browser.py drives it).

The server is the real ``msknode web`` command with ``MSKNODE_ROUTING_RULES`` pointing at a
site copy of the shipped rules; the series are index rows routed by the real completeness
tick: one the rules route, one they do not ("ANONYMIZED_SERIES", as an anonymiser leaves it).
"""

from __future__ import annotations

import shutil
import tomllib

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select

from support import web_seed as ws
from support.browser import ADMIN, console_errors, login, shot, wait, web_server
from support.index_rows import at, make_study, send_series

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("webrouting-ui")
    data, site = base_dir / "data", base_dir / "site"
    site.mkdir()
    from node.intake.completeness import tick
    from node.intake.routing import load_rules
    from node.settings import DEFAULT_ROUTING_RULES
    from node.web.users import add_user

    rules_path = site / "routing_rules.toml"
    shutil.copyfile(DEFAULT_ROUTING_RULES, rules_path)
    node = ws.isolated_node(data, routing_rules=rules_path, quiet_seconds=0.5, study_quiet_seconds=0.5)
    with node as (settings, db, _policy):
        with db.session() as s:
            st = make_study(s, description="MR KNEE")
            send_series(s, st, description="PD_TSE_FS_SAG", count=12, now=at(0), number=2)
            anon = send_series(s, st, description="ANONYMIZED_SERIES", count=10, now=at(0.1), number=3)
            anon_id, anon_uid, study_id = anon.id, anon.series_uid, st.id
        with db.session() as s:
            tick(s, settings, at(5.0), load_rules(rules_path))
        with db.session() as s:
            add_user(s, username=ADMIN[0], password=ADMIN[1], role="admin")

    with web_server(data, base_dir / "web.log", MSKNODE_ROUTING_RULES=rules_path) as url:
        yield {
            "base": url,
            "settings": settings,
            "rules_path": rules_path,
            "anon_id": anon_id,
            "anon_uid": anon_uid,
            "study_id": study_id,
        }


def test_admin_turns_an_unrouted_series_into_a_rule(server, browser, tmp_path):
    d, base, sid = browser, server["base"], server["anon_id"]
    login(d, base, ADMIN)
    d.find_element(By.ID, "nav-unrouted").click()
    wait(d).until(EC.presence_of_element_located((By.ID, "unrouted")))
    row = d.find_element(By.CSS_SELECTOR, f'tr.unrouted-row[data-series="{sid}"]')
    assert "ANONYMIZED_SERIES" in row.text and "unrouted:no_rule" in row.text and "KNEE" in row.text
    signals = d.find_element(By.ID, f"signals-{sid}")
    signals.find_element(By.TAG_NAME, "summary").click()
    assert signals.get_attribute("open") is not None  # the signals table (or "not recorded") unfolds
    assert console_errors(d) == []
    shot(d, tmp_path / "unrouted.png")

    d.find_element(By.ID, f"make-rule-{sid}").click()
    wait(d).until(EC.presence_of_element_located((By.ID, "rule-form")))
    assert d.find_element(By.ID, "rule-description").get_attribute("value") == "^ANONYMIZED SERIES$"
    assert Select(d.find_element(By.ID, "rule-pipeline")).first_selected_option.get_attribute("value") == "knee"
    assert d.find_element(By.ID, "rule-reroute").is_selected()
    name = d.find_element(By.ID, "rule-name")
    name.clear()
    name.send_keys("site anonymised sagittal knee")
    Select(d.find_element(By.ID, "rule-role")).select_by_visible_text("sag_fluid")
    facts = {
        k: d.find_element(By.ID, f"rule-{k}").get_attribute("value")
        for k in ("plane", "contrast")
        if d.find_elements(By.ID, f"rule-{k}")
    }  # prefilled from what was recognised
    shot(d, tmp_path / "rule.png")
    d.find_element(By.ID, "rule-submit").click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "flash-msg"), "site anonymised sagittal knee"))
    flash = d.find_element(By.ID, "flash-msg").text
    assert "routed knee/sag_fluid" in flash and str(server["rules_path"]) in flash
    assert not d.find_elements(By.CSS_SELECTOR, f'tr.unrouted-row[data-series="{sid}"]')
    rules = tomllib.loads(server["rules_path"].read_text())["rule"]
    expected = {
        "name": "site anonymised sagittal knee",
        "pipeline": "knee",
        "role": "sag_fluid",
        "description": "^ANONYMIZED SERIES$",
    }
    if facts.get("plane"):
        expected["plane"] = facts["plane"]
    if facts.get("contrast"):
        expected["contrast"] = [c.strip() for c in facts["contrast"].split(",")]
    assert rules[0] == expected

    d.get(f"{base}/studies/{server['study_id']}")
    panel = wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, f'tr.series-route[data-series="{sid}"]')))
    assert "knee / sag_fluid" in panel.text and "site anonymised sagittal knee" in panel.text
    # index rows only: the viewer has no stored files to show here (its 422 is logged once it has answered)
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") in ("1", "error"))
    console_errors(d)
    d.get(base + "/admin/audit?action=routing.")
    [event] = d.find_elements(By.CSS_SELECTOR, "tr.audit-row")
    assert event.get_attribute("data-action") == "routing.rule_add"
    assert "alice" in event.text and "site anonymised sagittal knee" in event.text and "knee/sag_fluid" in event.text
    assert console_errors(d) == []

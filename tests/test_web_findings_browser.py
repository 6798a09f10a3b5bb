"""A finding's number, QC refusals, times and the viewer's toggles, as a reader sees them in Chromium.

The real ``msknode web`` (site zone Europe/Berlin) on a database seeded with: a knee whose ACL
tear the model is sure of but grades "partial" (P(tear) 98 %: partial 71 %, complete 27 %), a
knee whose ACL model and super-resolution were refused by the QC gate with a message that calls
the sagittal series "coronal", and a knee with no result objects at all. The browser runs in
another zone and a 12-hour locale, so a time formatted by the browser would show.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from zoneinfo import ZoneInfo

import pytest
from selenium.webdriver.common.by import By

from support import web_seed as ws
from support.browser import ADMIN, READER, api_get, console_errors, login, wait, web_server

pytestmark = pytest.mark.integration

TEXT = "ACL tear 98 % (partial 71 %, complete 27 %)"
GATE_MESSAGE = "anatomy classifier: pixels look like knee/coronal (P=0.97)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("webfindings") / "data"
    from node.db.schema import Finding

    with ws.isolated_node(data) as (settings, db, policy):
        now = dt.datetime.now(dt.UTC)
        misgraded = ws.acl_misgraded(site="anterior cruciate ligament")
        refused = [
            ws.F(
                "knee.acl",
                "knee.acl: not evaluated (wrong_orientation)",
                None,
                None,
                None,
                evaluated=False,
                qc_reason="wrong_orientation",
                model_name="knee.acl",
            ),
            ws.F(
                "superres",
                "Super-resolution not done (wrong_orientation)",
                None,
                None,
                None,
                evaluated=False,
                qc_reason="wrong_orientation",
                model_name="superres",
            ),
        ]
        seeded = {
            "acl": ws.seed_study(
                db,
                settings,
                policy,
                findings=misgraded,
                patient_name="KLEIN^ANNA",
                patient_id="MRN-1",
                received_at=now - dt.timedelta(minutes=40),
                seed=7,
            ),
            "refused": ws.seed_study(
                db,
                settings,
                policy,
                findings=refused,
                patient_name="BRAUN^OTTO",
                patient_id="MRN-2",
                received_at=now - dt.timedelta(minutes=30),
                with_seg=False,
                with_superres=False,
                seed=8,
            ),
            "bare": ws.seed_study(
                db,
                settings,
                policy,
                findings=ws.knee_normal(),
                patient_name="WOLF^EVA",
                patient_id="MRN-3",
                received_at=now - dt.timedelta(minutes=20),
                with_seg=False,
                with_superres=False,
                outbox_states=(),
                seed=9,
            ),
        }
        with db.session() as s:
            for f in s.query(Finding).filter(Finding.job_id == seeded["refused"].job_id):
                f.qc_message = GATE_MESSAGE  # what the gate said: contradicts the series' sagittal header
        ws.add_users(db, admin=ADMIN, radiologist=READER)
    with web_server(data, data.parent / "web.log", MSKNODE_SITE_TIMEZONE="Europe/Berlin") as base:
        yield {"base": base, "seeded": seeded}


@pytest.fixture(scope="module")
def reader(server, browser):
    # the browser's own zone and locale differ from the node's (12-hour, New York)
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "America/New_York"})
    browser.execute_cdp_cmd("Emulation.setLocaleOverride", {"locale": "en-US"})
    login(browser, server["base"], READER)
    return browser


def row_of(d, study_id):
    return d.find_element(By.CSS_SELECTOR, f"#rows tr.entry[data-href='/studies/{study_id}']")


def test_worklist_study_page_reasons_and_api_show_the_same_number(server, reader):
    d, acl = reader, server["seeded"]["acl"]
    d.get(server["base"] + "/worklist")
    row = row_of(d, acl.study_id)
    assert row.get_attribute("data-priority") == "URGENT"  # a sure tear, whatever grade the model names
    chip = row.find_element(By.CSS_SELECTOR, ".chip.pos[data-code='acl_tear']").text
    why = row.find_element(By.CSS_SELECTOR, "td.why").text
    assert chip.startswith(TEXT) and TEXT in why, (chip, why)
    assert "100 %" not in row.text and "1.00" not in row.text and "98%" not in row.text

    d.find_element(By.CSS_SELECTOR, f"a.pt-name[href='/studies/{acl.study_id}']").click()
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") == "1")
    study_text = d.find_element(By.CSS_SELECTOR, "#findings tr.finding-row[data-code='acl_tear'] .finding-text").text
    reasons = d.find_element(By.ID, "reasons").text
    assert study_text == TEXT and TEXT in reasons
    headline = d.find_element(By.CSS_SELECTOR, "#findings tr.finding-row[data-code='acl_tear'] .prob").text
    assert headline == "98 %"

    body = api_get(server["base"], READER, f"/api/studies/{acl.study_id}", timeout=10)
    (f,) = [f for f in body["findings"] if f["code"] == "acl_tear"]
    assert f["display"]["text"] == TEXT and f["display"]["probability"] == pytest.approx(0.98)
    assert [g["grade"] for g in f["display"]["grades"]] == ["partial", "complete"]
    wl = api_get(server["base"], READER, "/api/worklist", timeout=10)
    (entry,) = [e for e in wl["entries"] if e["study_id"] == acl.study_id]
    assert any(x["display"]["text"] == TEXT for x in entry["findings"]) and TEXT in entry["reasons"][0]
    assert console_errors(d) == []


def test_a_refusal_reaches_the_reader_in_words_once_and_never_contradicts_the_image(server, reader):
    d, refused = reader, server["seeded"]["refused"]
    d.get(server["base"] + "/worklist")
    row = row_of(d, refused.study_id).text
    words = "the quality check judged the slice orientation unsuitable for the model"
    assert f"ACL tear not evaluated: {words}" in row
    d.get(f"{server['base']}/studies/{refused.study_id}")
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") in ("1", "error"))
    page = d.find_element(By.TAG_NAME, "main").text
    assert f"Super-resolution not done: {words}" in page
    for text in (row, page):
        assert "coronal" not in text.lower() and "wrong_orientation" not in text and "wrong orientation" not in text
        assert "not done (" not in text
    reasons = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#reasons li")]
    assert len(reasons) == len(set(reasons))
    assert not d.find_elements(By.CSS_SELECTOR, ".qc-details")  # the gate's message is the admin's
    body = api_get(server["base"], READER, f"/api/studies/{refused.study_id}", timeout=10)
    assert "coronal" not in json.dumps(body)
    # the admin still sees what the gate said, folded under details
    login(d, server["base"], ADMIN)
    d.get(f"{server['base']}/studies/{refused.study_id}")
    details = d.find_elements(By.CSS_SELECTOR, ".qc-details")
    assert details and GATE_MESSAGE in details[0].get_attribute("textContent")
    assert GATE_MESSAGE in json.dumps(api_get(server["base"], ADMIN, f"/api/studies/{refused.study_id}", timeout=10))
    login(d, server["base"], READER)


def test_times_are_the_node_zone_in_24_hours_also_after_a_refresh(server, reader):
    d = reader
    d.get(server["base"] + "/worklist")
    assert d.execute_script("return Intl.DateTimeFormat().resolvedOptions().timeZone") == "America/New_York"
    stamp = re.compile(r"^updated (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) · every 30 s$")

    def berlin_close(text):
        m = stamp.match(text)
        assert m, text
        shown = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo("Europe/Berlin"))
        return abs((dt.datetime.now(dt.UTC) - shown).total_seconds()) < 120

    assert berlin_close(d.find_element(By.ID, "refresh-state").text)
    d.execute_script("document.getElementById('refresh-state').textContent = ''; window.msknodeRefresh()")
    wait(d).until(lambda x: x.find_element(By.ID, "refresh-state").text.startswith("updated"))
    after = d.find_element(By.ID, "refresh-state").text
    assert "AM" not in after and "PM" not in after
    assert berlin_close(after), after
    received = [td.text.split("\n")[0] for td in d.find_elements(By.CSS_SELECTOR, "#rows tr.entry td:nth-child(6)")]
    assert received and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d$", t) for t in received), received


def test_toggles_of_results_that_do_not_exist_are_not_offered(server, reader):
    d, bare, acl = reader, server["seeded"]["bare"], server["seeded"]["acl"]
    d.get(f"{server['base']}/studies/{bare.study_id}")
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") == "1")
    for box in ("overlay-toggle", "sr-toggle"):
        el = d.find_element(By.ID, box)
        assert not el.is_displayed() and not el.is_selected() and not el.is_enabled(), box
    assert not d.find_element(By.ID, "pane-sr").is_displayed()
    assert "no AI overlay or super-resolved series" in d.find_element(By.ID, "no-results-note").text
    # with results, both are offered and on
    d.get(f"{server['base']}/studies/{acl.study_id}")
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") == "1")
    for box in ("overlay-toggle", "sr-toggle"):
        el = d.find_element(By.ID, box)
        assert el.is_displayed() and el.is_selected() and el.is_enabled(), box
    assert console_errors(d) == []

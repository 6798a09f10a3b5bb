"""A radiologist answers the AI with the keyboard; the admin sees agreement, PPV and an alert, in Chromium.

The real ``msknode web`` on a database seeded with eight weeks of knee.acl history (a positive
rate of 20 % and answers from another radiologist), then a last week at 60 % positive (outside
the control band), and a knee whose ACL tear the model grades "partial". The reader grades it
"complete" and agrees with the negative meniscus result using only keys; the admin dashboard
shows agreement and estimated PPV with their 95 % intervals and the alert, ``/metrics`` its
gauge and ``msknode monitor --json`` its status; overdue URGENT studies are red on the worklist
until the admin changes the reading target (audited).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from support import web_seed as ws
from support.browser import ADMIN, READER, api_get, console_errors, login, shot, wait, web_server
from support.cli import msknode
from support.monitor_seed import Phase, answer, seed_history

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("monitoring") / "data"
    with ws.isolated_node(data) as (settings, db, policy):
        now = dt.datetime.now(dt.UTC)
        ids = seed_history(
            db,
            policy,
            now=now,
            phases=[
                Phase(120, 56, 7.5, positive_rate=0.2, read_after_minutes=90),
                Phase(40, 6.5, 0.5, positive_rate=0.6),
            ],
        )
        answer(db, ids[:120], user="eve", agree_rate=0.75, now=now - dt.timedelta(days=8))
        acl = ws.seed_study(
            db,
            settings,
            policy,
            findings=ws.acl_misgraded(),
            patient_name="KLEIN^ANNA",
            patient_id="MRN-1",
            received_at=now - dt.timedelta(minutes=20),
            with_seg=False,
            with_superres=False,
            seed=3,
        )
        ws.add_users(db, admin=ADMIN, radiologist=READER)
    with web_server(data, data.parent / "web.log") as base:
        yield {"base": base, "acl": acl, "data": data}


def keys(d, text):
    ActionChains(d).send_keys(text).perform()


def item(d, key):
    return d.find_element(By.CSS_SELECTOR, f"#feedback .fb-item[data-key='{key}']")


def test_a_reader_records_agreement_and_a_corrected_grade_with_the_keyboard(server, browser, shots):
    d, acl = browser, server["acl"]
    login(d, server["base"], READER)
    d.get(f"{server['base']}/studies/{acl.study_id}")
    wait(d).until(lambda x: "current" in item(x, "acl_tear").get_attribute("class"))
    assert item(d, "acl_tear").get_attribute("data-ai") == "partial"
    keys(d, "d")  # disagree ...
    assert "choosing" in item(d, "acl_tear").get_attribute("class")
    keys(d, "3")  # ... the third answer on the scale: complete
    wait(d).until(lambda x: item(x, "acl_tear").get_attribute("data-answer") == "complete")
    assert item(d, "acl_tear").get_attribute("data-agree") == "0"
    # saving moved on to the next finding: the negative meniscus result, which the reader accepts
    wait(d).until(lambda x: "current" in item(x, "meniscal_tear").get_attribute("class"))
    keys(d, "a")
    wait(d).until(lambda x: item(x, "meniscal_tear").get_attribute("data-agree") == "1")
    # back to the ACL, a comment, Enter saves it with the answer already given
    keys(d, "k")
    keys(d, "c")
    keys(d, "stump retracted\n")
    wait(d).until(lambda x: item(x, "acl_tear").find_element(By.CSS_SELECTOR, ".fb-comment").get_attribute("value"))

    def stored():
        body = api_get(server["base"], READER, f"/api/studies/{acl.study_id}/feedback")
        return {i["finding_key"]: i["mine"] for i in body["items"]}

    wait(d).until(lambda _: (stored()["acl_tear"] or {}).get("comment") == "stump retracted")
    mine = stored()
    assert {k: (v["agree"], v["answer"], v["source"]) for k, v in mine.items()} == {
        "acl_tear": (False, "complete", "web"),
        "meniscal_tear": (True, "none", "web"),
    }
    assert mine["acl_tear"]["model"] == {"name": "knee.acl", "version": "0.1.0", "weights_sha256": "ab" * 32}
    d.refresh()
    wait(d).until(lambda x: item(x, "acl_tear").is_displayed())
    assert item(d, "acl_tear").find_element(By.CSS_SELECTOR, ".fb-state").text.startswith("You disagreed: complete")
    d.execute_script("document.getElementById('feedback').scrollIntoView()")
    shot(d, shots / "feedback.png")
    assert console_errors(d) == []


def test_the_dashboard_shows_agreement_ppv_with_intervals_and_the_positive_rate_alert(server, browser, shots, capsys):
    d = browser
    login(d, server["base"], ADMIN)
    d.get(server["base"] + "/admin/dashboard")
    banner = wait(d).until(lambda x: x.find_element(By.ID, "monitor-alerts"))
    assert banner.get_attribute("data-status") == "alert"
    alert = d.find_element(By.CSS_SELECTOR, ".alert-item[data-kind='positive_rate'][data-model='knee.acl']").text
    assert "knee.acl 1.0.0: positive rate 60.0 % (24/40)" in alert and "outside its control band" in alert

    rep = api_get(server["base"], ADMIN, "/api/admin/monitor")
    m = next(x for x in rep["models"] if (x["model"], x["version"]) == ("knee.acl", "1.0.0"))
    card = d.find_element(By.CSS_SELECTOR, ".model-card[data-model='knee.acl'][data-version='1.0.0']")
    for cls, w in (("agreement", m["feedback"]["agreement"]), ("ppv", m["feedback"]["ppv"])):
        text = card.find_element(By.CSS_SELECTOR, f"td.{cls}").text
        expect = f"{100 * w['p']:.1f} % (95 % CI {100 * w['lo']:.1f}–{100 * w['hi']:.1f} %, {w['k']}/{w['n']})"
        assert text == expect, (cls, text)
        assert w["lo"] < w["p"] < w["hi"] and w["n"] > 20
    assert card.find_element(By.CSS_SELECTOR, "li.check[data-metric='positive_rate']").get_attribute("data-status") == (
        "alert"
    )
    # the model version the reader answered is its own row
    assert d.find_elements(By.CSS_SELECTOR, ".model-card[data-model='knee.acl'][data-version='0.1.0']")
    # turnaround: every reference study was read 90 minutes after it arrived
    row = d.find_element(By.CSS_SELECTOR, "#turnaround tr.ta-row[data-priority='ROUTINE']")
    assert (
        row.find_element(By.CSS_SELECTOR, ".ta-median").text
        == "1 h 30 min"
        == row.find_element(By.CSS_SELECTOR, ".ta-p90").text
    )
    assert row.find_element(By.CSS_SELECTOR, ".ta-within").text == "100.0 %"
    shot(d, shots / "dashboard.png")
    assert console_errors(d) == []

    with urllib.request.urlopen(server["base"] + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert 'msknode_model_check_alert{check="positive_rate",model="knee.acl",version="1.0.0"} 1.0' in metrics
    assert "msknode_monitor_status 1.0" in metrics

    r = msknode(capsys, "monitor", "--json", MSKNODE_DATA_DIR=server["data"])
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "alert" and any(a["kind"] == "positive_rate" for a in out["alerts"])


def test_overdue_urgent_studies_are_red_until_the_admin_changes_the_target(server, browser):
    d = browser
    login(d, server["base"], ADMIN)
    d.get(server["base"] + "/worklist")
    banner = wait(d).until(lambda x: x.find_element(By.ID, "overdue-banner"))
    assert "past the reading target" in banner.text
    late = d.find_elements(By.CSS_SELECTOR, "#rows tr.entry.overdue[data-priority='URGENT']")
    assert late and all("OVERDUE since" in r.find_element(By.CSS_SELECTOR, ".due").text for r in late)
    fresh = d.find_element(By.CSS_SELECTOR, f"#rows tr.entry[data-href='/studies/{server['acl'].study_id}']")
    assert "overdue" not in fresh.get_attribute("class") and "due " in fresh.find_element(By.CSS_SELECTOR, ".due").text

    d.get(server["base"] + "/admin/dashboard#targets")
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "target-priority")).select_by_value("URGENT")
    d.find_element(By.ID, "target-minutes").send_keys("43200")
    d.find_element(By.ID, "target-reason").send_keys("backlog plan agreed with the department")
    d.find_element(By.ID, "target-submit").click()
    wait(d).until(lambda x: x.find_element(By.ID, "flash-msg").text == "reading target saved")
    cell = d.find_element(By.CSS_SELECTOR, "#targets tr[data-priority='URGENT'] .target-minutes")
    assert cell.text == "43200 min"
    d.get(server["base"] + "/worklist")
    wait(d).until(lambda x: x.find_element(By.ID, "worklist"))
    assert not d.find_elements(By.ID, "overdue-banner")
    audit = api_get(server["base"], ADMIN, "/api/admin/audit?action=targets.change")
    ev = audit["events"][0]
    assert ev["actor"] == ADMIN[0] and ev["new"] == "43200 min" and "backlog" in ev["reason"]
    assert console_errors(d) == []

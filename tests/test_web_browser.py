"""The web UI in a real headless Chromium (Debian chromium + chromedriver, driven by Selenium).

The server is the real ``msknode web`` command on a free loopback port, on a database
seeded with phantom studies (models.phantoms series, a highdicom SEG, a derived
super-resolved series). Screenshots go to a temporary directory; with
``MSKNODE_UPDATE_SCREENSHOTS=1`` they replace docs/screenshots/*.png.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select

from support import web_seed as ws
from support.browser import ADMIN, READER, console_errors, image_loaded, login, shot, wait, web_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("webui") / "data"
    with ws.isolated_node(data) as (settings, db, policy):
        now = dt.datetime.now(dt.UTC)
        seeded = {
            "acl": ws.seed_study(
                db,
                settings,
                policy,
                findings=ws.acl_complete(),
                phantom={"acl": "complete"},
                seed=7,
                patient_name="DOE^JANE",
                patient_id="MRN-20417",
                accession="A24-1187",
                received_at=now - dt.timedelta(minutes=52),
            ),
            "spine": ws.seed_study(
                db,
                settings,
                policy,
                anatomy="lumbar_spine",
                findings=ws.spine_severe(),
                phantom={"stenosis": {"L4-L5": "severe"}},
                seed=11,
                patient_name="ROSSI^MARIA",
                patient_id="MRN-20398",
                accession="A24-1192",
                received_at=now - dt.timedelta(minutes=18),
            ),
            "normal": ws.seed_study(
                db,
                settings,
                policy,
                findings=ws.knee_normal(),
                patient_name="MUELLER^HANS",
                patient_id="MRN-20311",
                accession="A24-1160",
                received_at=now - dt.timedelta(hours=3, minutes=5),
                study_date="20240305",
                study_time="081512",
                seed=1,
            ),
            "qc": ws.seed_study(
                db,
                settings,
                policy,
                anatomy="shoulder",
                findings=[
                    ws.F(
                        "rotator_cuff_tear",
                        "Supraspinatus tear",
                        None,
                        None,
                        None,
                        evaluated=False,
                        qc_reason="motion",
                        model_name="shoulder.rotator_cuff",
                    )
                ],
                patient_name="NOVAK^PETRA",
                patient_id="MRN-20355",
                accession="A24-1171",
                received_at=now - dt.timedelta(hours=1, minutes=40),
                study_time="101003",
                with_seg=False,
                seed=2,
            ),
            "pending": ws.seed_study(
                db,
                settings,
                policy,
                findings=[],
                patient_name="SILVA^JOAO",
                patient_id="MRN-20421",
                job_state="processing",
                with_seg=False,
                with_superres=False,
                outbox_states=(),
                received_at=now - dt.timedelta(minutes=2),
                seed=3,
            ),
        }
        ws.add_users(db, admin=ADMIN, radiologist=READER)

    with web_server(data, data.parent / "web.log", MSKNODE_SITE_TIMEZONE="Europe/Berlin") as base:
        yield {"base": base, "seeded": seeded, "settings": settings}


def test_admin_reads_the_urgent_study_first_toggles_the_overlay_and_reprioritises(server, browser, shots):
    d, base = browser, server["base"]
    login(d, base, ADMIN)
    rows = d.find_elements(By.CSS_SELECTOR, "#rows tr.entry[data-priority]")
    assert [r.get_attribute("data-priority") for r in rows] == ["URGENT", "URGENT", "ROUTINE", "ROUTINE"]
    assert "DOE, JANE" in rows[0].text and "MRN-20417" in rows[0].text  # longest-waiting urgent study on top
    assert "ROSSI, MARIA" in rows[1].text and "L4-L5" in rows[1].text
    assert "needs review" in rows[3].text
    assert "Supraspinatus tear not evaluated: the images show heavy motion artefacts" in rows[3].text
    assert "SILVA, JOAO" in d.find_element(By.ID, "rows").text  # the study still in processing is listed below
    head = d.find_element(By.CSS_SELECTOR, "#worklist thead").text
    assert "AS SENT BY THE MODALITY" in head.upper() and "EUROPE/BERLIN" in head.upper()
    d.execute_script("window.scrollTo(0, 0)")
    assert console_errors(d) == []
    shot(d, shots / "worklist.png")

    rows[0].find_element(By.CSS_SELECTOR, "a.pt-name").click()
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") == "1")
    wait(d).until(lambda x: image_loaded(x, "img-orig") and image_loaded(x, "img-ovl") and image_loaded(x, "img-sr"))
    assert d.find_element(By.ID, "demo-notice").is_displayed()
    assert "NOT FOR DIAGNOSTIC USE" in d.find_element(By.ID, "demo-notice").text
    ovl = d.find_element(By.ID, "img-ovl")
    assert ovl.is_displayed() and d.find_element(By.ID, "viewer").get_attribute("data-overlay") == "on"
    assert "AI evidence on this slice" in d.find_element(By.ID, "c-ai").text
    assert "knee.acl" in d.find_element(By.ID, "models").text
    widths = d.execute_script(
        "return Array.from(document.querySelectorAll('#findings .bar[data-p]')).map("
        "b => [parseFloat(b.dataset.p), b.firstElementChild.getBoundingClientRect().width / b.getBoundingClientRect().width]);"
    )
    assert widths and all(abs(p - w) < 0.05 for p, w in widths), widths  # bars drawn to scale (no inline styles: CSP)
    time.sleep(0.3)
    assert console_errors(d) == []
    shot(d, shots / "study.png")

    d.find_element(By.ID, "overlay-toggle").click()
    assert not ovl.is_displayed() and d.find_element(By.ID, "viewer").get_attribute("data-overlay") == "off"
    assert d.find_element(By.ID, "overlay-state").text == "AI overlay hidden"
    d.find_element(By.ID, "overlay-toggle").click()
    assert ovl.is_displayed() and d.find_element(By.ID, "viewer").get_attribute("data-overlay") == "on"
    d.execute_script(
        "var r = document.getElementById('overlay-opacity'); r.value = 30; r.dispatchEvent(new Event('input'));"
    )
    assert float(ovl.value_of_css_property("opacity")) == pytest.approx(0.3, abs=0.01)

    from selenium.webdriver import ActionChains

    stage = d.find_element(By.ID, "stage-orig")
    ActionChains(d).move_to_element(stage).click_and_hold().move_by_offset(120, -60).release().perform()
    b, c = (float(v) for v in d.find_element(By.ID, "viewer").get_attribute("data-wl").split(","))
    assert b > 1.1 and c > 1.5 and "contrast" in d.find_element(By.ID, "img-orig").value_of_css_property("filter")
    ActionChains(d).double_click(stage).perform()
    assert d.find_element(By.ID, "viewer").get_attribute("data-wl") == "1.00,1.00"

    label = d.find_element(By.ID, "slice-label").text
    k = int(label.split()[1])
    src = d.find_element(By.ID, "img-orig").get_attribute("src")
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    wait(d).until(lambda x: x.find_element(By.ID, "slice-label").text == f"slice {k + 1} / 30")
    assert d.find_element(By.ID, "img-orig").get_attribute("src") != src
    wait(d).until(lambda x: image_loaded(x, "img-orig"))

    Select(d.find_element(By.ID, "priority-select")).select_by_value("STAT")
    d.find_element(By.ID, "priority-reason").send_keys("orthopaedic surgeon waiting in clinic")
    d.find_element(By.ID, "priority-submit").click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "flash-msg"), "priority set to STAT"))
    assert d.find_element(By.ID, "study-priority").text == "STAT"
    first = d.find_element(By.CSS_SELECTOR, "#history li").text
    assert "alice" in first and "URGENT → STAT" in first and "orthopaedic surgeon waiting in clinic" in first

    d.get(base + "/worklist")
    top = d.find_element(By.CSS_SELECTOR, "#rows tr.entry[data-priority]")
    assert top.get_attribute("data-priority") == "STAT" and "DOE, JANE" in top.text and "override" in top.text

    d.get(base + "/admin/audit")
    audit = [
        r
        for r in d.find_elements(By.CSS_SELECTOR, "tr.audit-row")
        if r.get_attribute("data-action") == "worklist.override_priority"
    ]
    assert len(audit) == 1
    assert "alice" in audit[0].text and "URGENT → STAT" in audit[0].text and "orthopaedic surgeon" in audit[0].text
    views = [
        r for r in d.find_elements(By.CSS_SELECTOR, "tr.audit-row") if r.get_attribute("data-action") == "study.view"
    ]
    assert views and "alice" in views[0].text
    assert console_errors(d) == []
    shot(d, shots / "audit.png")


def test_worklist_refreshes_itself_with_new_studies(server, browser):
    d, base = browser, server["base"]
    login(d, base, READER)
    assert "KOWALSKI" not in d.find_element(By.ID, "rows").text
    from node.db.database import Database
    from worklists.triage import load_policy

    settings = server["settings"]
    db = Database(settings.database_url)
    try:
        ws.seed_study(
            db,
            settings,
            load_policy(settings.triage_policy),
            anatomy="lumbar_spine",
            findings=ws.spine_severe(),
            patient_name="KOWALSKI^ANNA",
            patient_id="MRN-20430",
            with_seg=False,
            with_superres=False,
            seed=5,
            received_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
        )
    finally:
        db.dispose()
    d.execute_script("window.msknodeRefresh()")
    wait(d).until(lambda x: "KOWALSKI, ANNA" in x.find_element(By.ID, "rows").text)
    assert "updated" in d.find_element(By.ID, "refresh-state").text
    assert d.find_element(By.ID, "worklist").is_displayed()  # the page itself was not reloaded


def test_radiologist_cannot_reach_admin_actions(server, browser):
    d, base = browser, server["base"]
    login(d, base, READER)
    nav = d.find_element(By.CSS_SELECTOR, "nav.nav").text
    assert "Worklist" in nav and "Jobs" not in nav and "Audit log" not in nav
    acl = server["seeded"]["acl"]
    d.get(f"{base}/studies/{acl.study_id}")
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") == "1")
    assert not d.find_elements(By.ID, "priority-form") and not d.find_elements(By.ID, "assign-form")
    assert d.find_element(By.ID, "mark-read").is_displayed()
    d.get(base + "/admin/jobs")
    assert "admin role required" in d.find_element(By.ID, "error-reason").text
    status = d.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch('/api/entries/' + arguments[0] + '/priority', {method: 'POST', credentials: 'same-origin',
              headers: {'Content-Type': 'application/json', 'X-CSRF-Token': document.body.dataset.csrf},
              body: JSON.stringify({priority: 'STAT', reason: 'trying'})})
          .then(r => r.json().then(b => done([r.status, b.detail])));
        """,
        acl.entry_id,
    )
    assert status == [403, "admin role required"]
    # the radiologist's own action works from the same page
    d.get(f"{base}/studies/{acl.study_id}")
    d.find_element(By.ID, "mark-read").click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "flash-msg"), "marked read"))
    assert d.find_element(By.ID, "read-status").text.startswith("read by rob")

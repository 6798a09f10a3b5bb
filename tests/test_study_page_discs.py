"""The study page's per-level table of a lumbar spine study, as a reader sees it in Chromium.

The real ``msknode web`` on a database seeded with a lumbar study: stenosis graded at L1-L2 ... L5-S1
(severe at L4-L5) by ``lumbar_spine.stenosis``, Pfirrmann grade and herniation at L2-L3 ... L5-S1 by
``lumbar_spine.discs`` (no disc located at L1-L2), and a second version of the discs model running in
shadow whose herniation call at L5-S1 sits beside the active one, labelled SHADOW.
"""

from __future__ import annotations

import datetime as dt

import pytest
from selenium.webdriver.common.by import By

from support import web_seed as ws
from support.browser import ADMIN, READER, login, shot, wait, web_server

pytestmark = pytest.mark.integration

DISCS = "lumbar_spine.discs"
# level: (Pfirrmann grade, P(III-V), P(herniation))
DISC_GRADES = {
    "L2-L3": ("2", 0.12, 0.05),
    "L3-L4": ("3", 0.71, 0.22),
    "L4-L5": ("4", 0.93, 0.82),
    "L5-S1": ("5", 0.97, 0.31),
}


def disc_findings() -> list[ws.F]:
    out = []
    for level, (grade, p_deg, p_hern) in DISC_GRADES.items():
        split = dict.fromkeys("12345", 0.02)
        split[grade] = 0.92
        out.append(
            ws.F(
                "disc_degeneration",
                "Disc degeneration",
                p_deg,
                0.03,
                int(grade) >= 3,
                grade=grade,
                level=level,
                grade_probabilities=split,
                model_name=DISCS,
                site=f"intervertebral disc {level}",
            )
        )
        out.append(
            ws.F(
                "disc_herniation",
                "Disc herniation",
                p_hern,
                0.04,
                p_hern >= 0.5,
                level=level,
                model_name=DISCS,
                site=f"intervertebral disc {level}",
            )
        )
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("studydiscs") / "data"
    from node.db.schema import Finding

    with ws.isolated_node(data) as (settings, db, policy):
        shadow = ws.F("disc_herniation", "Disc herniation", 0.64, 0.05, True, level="L5-S1", model_name=DISCS)
        spine = ws.seed_study(
            db,
            settings,
            policy,
            anatomy="lumbar_spine",
            findings=ws.spine_severe() + disc_findings() + [shadow],
            patient_name="STEIN^PAUL",
            patient_id="MRN-S1",
            received_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=15),
            with_superres=False,
            seed=11,
        )
        with db.session() as s:
            rows = s.query(Finding).filter(Finding.job_id == spine.job_id, Finding.code == "disc_herniation")
            for f in rows:
                if f.level == "L5-S1" and abs((f.probability or 0) - 0.64) < 1e-9:
                    f.shadow = True  # a silent trial's finding: stored and shown, never triaged or sent
                    f.model_version = "0.2.0"
        ws.add_users(db, admin=ADMIN, radiologist=READER)
    with web_server(data, data.parent / "web.log") as base:
        yield {"base": base, "spine": spine}


def _cell(row, column: str):
    return row.find_element(By.CSS_SELECTOR, f"td.level-cell.{column}")


def test_the_study_page_shows_stenosis_pfirrmann_and_herniation_per_level(server, browser, shots):
    d = browser
    login(d, server["base"], READER)
    d.get(server["base"] + f"/studies/{server['spine'].study_id}")
    wait(d, 20).until(lambda x: x.find_element(By.ID, "viewer").get_attribute("data-ready") == "1")
    table = d.find_element(By.ID, "stenosis-levels")
    d.execute_script("arguments[0].scrollIntoView()", table)
    shot(d, shots / "study_spine_levels.png")
    rows = {r.get_attribute("data-level"): r for r in table.find_elements(By.CSS_SELECTOR, "tr.level-row")}
    assert list(rows) == ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "tr th")]
    assert heads == ["Level", "Stenosis", "Pfirrmann", "Herniation"]

    l45 = rows["L4-L5"]
    assert _cell(l45, "stenosis").find_element(By.CSS_SELECTOR, ".grade").text == "severe"
    # P(stenosis) and its grade split; the full wording (as on the worklist) is the tooltip
    assert _cell(l45, "stenosis").find_element(By.CSS_SELECTOR, ".stenosis-p").text == "95 %"
    assert _cell(l45, "stenosis").find_element(By.CSS_SELECTOR, ".grade-split").text.startswith("severe 85 %, ")
    title = _cell(l45, "stenosis").find_element(By.CSS_SELECTOR, ".prob").get_attribute("title")
    assert title.startswith("Central canal stenosis L4-L5 95 % (severe 85 %")
    assert _cell(l45, "degeneration").find_element(By.CSS_SELECTOR, ".pfirrmann").text == "Pfirrmann IV"
    assert "P(III-V) 93 %" in _cell(l45, "degeneration").text
    assert _cell(l45, "herniation").find_element(By.CSS_SELECTOR, ".herniation-call").text == "present"
    assert _cell(l45, "herniation").find_element(By.CSS_SELECTOR, ".herniation-p").text == "82 %"

    l23 = rows["L2-L3"]
    assert _cell(l23, "degeneration").find_element(By.CSS_SELECTOR, ".pfirrmann").text == "Pfirrmann II"
    assert _cell(l23, "herniation").find_element(By.CSS_SELECTOR, ".herniation-call").text == "absent"
    assert "SHADOW" not in l23.text

    # no disc located at L1-L2: its stenosis grade, and no disc cells
    l12 = rows["L1-L2"]
    assert _cell(l12, "stenosis").find_element(By.CSS_SELECTOR, ".grade").text == "normal"
    assert _cell(l12, "degeneration").text == "—" and _cell(l12, "herniation").text == "—"

    # the shadow version's call beside the active one, labelled
    calls = _cell(rows["L5-S1"], "herniation").find_elements(By.CSS_SELECTOR, ".finding-row")
    assert [c.get_attribute("data-shadow") for c in calls] == ["0", "1"]
    assert "SHADOW" not in calls[0].text and calls[0].find_element(By.CSS_SELECTOR, ".herniation-call").text == "absent"
    assert calls[1].find_element(By.CSS_SELECTOR, ".shadow-tag").text == "SHADOW"
    assert calls[1].find_element(By.CSS_SELECTOR, ".herniation-call").text == "present"
    assert _cell(rows["L5-S1"], "degeneration").find_element(By.CSS_SELECTOR, ".pfirrmann").text == "Pfirrmann V"

    # the disc findings are in the level table only, not again in the list of other findings
    assert not d.find_elements(By.CSS_SELECTOR, "#findings > table:not(#stenosis-levels) [data-code^='disc_']")
    # the pair rule of the shipped policy put the study where it is, and says so
    reasons = d.find_element(By.ID, "reasons").text
    assert "[rule disc_herniation_severe_stenosis]" in reasons
    assert "Disc herniation L4-L5 82 %" in reasons

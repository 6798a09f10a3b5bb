"""Coded concepts used in our SR and SEG objects (see CODES.md for the table and sources).

Standard codes (SNOMED CT "SCT", DICOM "DCM", UCUM) are used wherever one exists;
the private scheme ``99MSKNODE`` only where none does. Every private code is listed
in CODES.md and declared in the objects' Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

PRIVATE_SCHEME = "99MSKNODE"
PRIVATE_SCHEME_VERSION = "1"


def sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


def dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "DCM", meaning)


def private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="msknode private codes",
            version=PRIVATE_SCHEME_VERSION,
            responsible_organization="msknode",
        )
    ]


# ---- units ------------------------------------------------------------------
NO_UNITS = CodedConcept("1", "UCUM", "no units")

# ---- findings (SNOMED CT where a concept exists) ------------------------------
FINDING_CODES: dict[str, CodedConcept] = {
    "acl_tear": sct("444798002", "Rupture of anterior cruciate ligament"),
    "meniscal_tear": sct("239720000", "Tear of meniscus of knee"),
    "rotator_cuff_tear": private("MSK-F-RCT", "Rotator cuff tear"),
    "spinal_stenosis": sct("76107001", "Spinal stenosis"),
    "disc_degeneration": sct("77547008", "Degeneration of intervertebral disc"),
    "disc_herniation": sct("73589001", "Herniation of intervertebral disc"),
}
# a model that refused its input still names what it would have looked for
MODEL_FINDING: dict[str, str] = {
    "knee.acl": "acl_tear",
    "knee.meniscus": "meniscal_tear",
    "shoulder.rotator_cuff": "rotator_cuff_tear",
    "lumbar_spine.stenosis": "spinal_stenosis",
    "lumbar_spine.discs": "disc_degeneration",
}


def finding_code(code: str, label: str | None = None) -> CodedConcept:
    if code in FINDING_CODES:
        return FINDING_CODES[code]
    meaning = (label or code.replace("_", " "))[:64]
    return private(f"MSK-F-{code.upper()}"[:16], meaning)


def finding_for_model(model_name: str) -> CodedConcept:
    return finding_code(MODEL_FINDING.get(model_name, model_name.split(".")[-1]))


# ---- anatomy -----------------------------------------------------------------
KNEE_JOINT = sct("49076000", "Knee joint")
MENISCUS = sct("74135004", "Meniscus")
ROTATOR_CUFF_TENDON = sct("245100002", "Tendon of Rotator Cuff of Shoulder")
SHOULDER = sct("16982005", "Shoulder")
KNEE = sct("72696002", "Knee")
LUMBAR_SPINE = sct("122496007", "Lumbar spine")
VERTEBRAL_CANAL = sct("61853006", "Vertebral canal")
INTERVERTEBRAL_DISC = sct("360499006", "Intervertebral disc structure")

DEFAULT_SITE: dict[str, CodedConcept] = {
    "acl_tear": KNEE_JOINT,
    "meniscal_tear": MENISCUS,
    "rotator_cuff_tear": ROTATOR_CUFF_TENDON,
    "spinal_stenosis": VERTEBRAL_CANAL,
    "disc_degeneration": INTERVERTEBRAL_DISC,
    "disc_herniation": INTERVERTEBRAL_DISC,
}
ANATOMY_REGION: dict[str, CodedConcept] = {
    "knee": KNEE,
    "shoulder": SHOULDER,
    "lumbar_spine": LUMBAR_SPINE,
}
SPINE_LEVELS: dict[str, CodedConcept] = {
    "T12-L1": sct("243926009", "Level of T12/L1 intervertebral disc"),
    "L1-L2": sct("243920003", "Level of L1/L2 intervertebral disc"),
    "L2-L3": sct("243921004", "Level of L2/L3 intervertebral disc"),
    "L3-L4": sct("243922006", "Level of L3/L4 intervertebral disc"),
    "L4-L5": sct("243923001", "Level of L4/L5 intervertebral disc"),
    "L5-S1": sct("243927000", "Level of L5/S1 intervertebral disc"),
}
MEDIAL = sct("255561001", "Medial")
LATERAL = sct("49370004", "Lateral")

LATERALITY: dict[str, CodedConcept] = {
    "R": sct("24028007", "Right"),
    "L": sct("7771000", "Left"),
    "B": sct("51440002", "Bilateral"),
}


def level_code(level: str) -> CodedConcept:
    key = level.upper().replace("/", "-").replace(" ", "")
    if key in SPINE_LEVELS:
        return SPINE_LEVELS[key]
    return private(f"MSK-L-{key}"[:16], f"Level {level}"[:64])


def site_codes(finding: str, site_text: str | None) -> tuple[CodedConcept, CodedConcept | None]:
    """(anatomic location, topographical modifier) for a finding and the model's site text."""
    base = DEFAULT_SITE.get(finding, KNEE_JOINT if finding.startswith("knee") else VERTEBRAL_CANAL)
    modifier = None
    if site_text:
        t = site_text.lower()
        if "medial" in t:
            modifier = MEDIAL
        elif "lateral" in t:
            modifier = LATERAL
        if "menisc" in t:
            base = MENISCUS
    return base, modifier


# ---- qualitative evaluation values ------------------------------------------
PRESENT = sct("52101004", "Present")
ABSENT = sct("272519000", "Absent")
NOT_EVALUATED = sct("373121007", "Not Evaluated")
SEVERITY = sct("246112005", "Severity")
GRADE_VALUES: dict[str, CodedConcept] = {
    "normal": sct("17621005", "Normal"),
    "none": sct("17621005", "Normal"),
    "mild": sct("255604002", "Mild"),
    "moderate": sct("6736007", "Moderate"),
    "severe": sct("24484000", "Severe"),
    "complete": sct("255594003", "Complete"),
    "partial": sct("255609007", "Partial"),
    "full_thickness": private("MSK-G-FULL", "Full thickness"),
    "partial_thickness": private("MSK-G-PARTIAL", "Partial thickness"),
}
SEVERITY_GRADES = {"normal", "none", "mild", "moderate", "severe"}
TEAR_EXTENT = private("MSK-C-EXTENT", "Tear extent")


# Pfirrmann grade of disc degeneration (Pfirrmann et al., Spine 26:1873-1878, 2001): I-V on
# sagittal T2. No SNOMED CT or DICOM concept for the grading system or its grades exists that we
# know of, so name and values are private codes (CODES.md).
PFIRRMANN_GRADE = private("MSK-C-PFIRRMANN", "Pfirrmann grade")
PFIRRMANN_VALUES: dict[str, CodedConcept] = {
    g: private(f"MSK-G-PFIRR{g}", f"Pfirrmann grade {roman}")
    for g, roman in (("1", "I"), ("2", "II"), ("3", "III"), ("4", "IV"), ("5", "V"))
}
# graded findings whose grade is not a severity or tear extent: finding code -> (grade name, values)
GRADING_SYSTEMS: dict[str, tuple[CodedConcept, dict[str, CodedConcept]]] = {
    "disc_degeneration": (PFIRRMANN_GRADE, PFIRRMANN_VALUES),
}


def grade_concept(grade: str, finding: str | None = None) -> tuple[CodedConcept, CodedConcept]:
    """(concept name, value) for a model grade; ``finding`` (the finding code) selects its grading
    system where it has its own (a Pfirrmann grade "3" of ``disc_degeneration``)."""
    if finding in GRADING_SYSTEMS:
        name, values = GRADING_SYSTEMS[finding]
        key = grade.strip().upper()
        key = {"I": "1", "II": "2", "III": "3", "IV": "4", "V": "5"}.get(key, key)
        if key in values:
            return name, values[key]
        return name, private(f"MSK-G-{key}"[:16], grade[:64])
    g = grade.lower().replace("-", "_").replace(" ", "_")
    value = GRADE_VALUES.get(g) or private(f"MSK-G-{g.upper()}"[:16], grade[:64])
    name = SEVERITY if g in SEVERITY_GRADES else TEAR_EXTENT
    return name, value


# ---- QC, triage, measurements --------------------------------------------------
QC_GATE = private("MSK-C-QC", "Input quality gate")
QC_ACCEPTED = private("MSK-QC-ACCEPTED", "Accepted")
QC_REFUSED = private("MSK-QC-REFUSED", "Refused")
QC_REASON = private("MSK-C-QCREASON", "Reason input not evaluated")
QC_REASONS: dict[str, str] = {
    "missing_series": "Required series missing",
    "wrong_anatomy": "Wrong anatomy",
    "wrong_sequence": "Wrong sequence",
    "too_few_slices": "Too few slices",
    "low_snr": "Signal-to-noise ratio too low",
    "motion": "Motion artefact",
    "out_of_distribution": "Out of distribution",
    "unreadable": "Series could not be read",
    "series_too_large": "Series too large",
}


def qc_reason_code(reason: str | None) -> CodedConcept:
    r = (reason or "unspecified").lower()
    meaning = QC_REASONS.get(r, r.replace("_", " ").capitalize())[:64]
    return private(f"MSK-QC-{r.upper().replace('_', '')}"[:16], meaning)


PROBABILITY = dcm("122157", "Probability")
# the per-disc group holds two probabilities, so each is named by what it is the probability of
PROBABILITY_HERNIATION = private("MSK-M-PHERN", "Probability of disc herniation")
PROBABILITY_DEGENERATION = private("MSK-M-PDEGEN", "Probability of Pfirrmann grade III-V")
STANDARD_DEVIATION = sct("386136009", "Standard Deviation")
PRIORITY = sct("260870009", "Priority")
TRIAGE = private("MSK-F-TRIAGE", "AI triage assessment")
TRIAGE_SCORE = private("MSK-M-TRIAGE", "Triage score")
PRIORITY_VALUES: dict[str, CodedConcept] = {
    "STAT": private("MSK-P-STAT", "STAT"),
    "URGENT": private("MSK-P-URGENT", "Urgent"),
    "ROUTINE": private("MSK-P-ROUTINE", "Routine"),
}


def priority_code(priority: str) -> CodedConcept:
    p = str(priority).upper()
    return PRIORITY_VALUES.get(p) or private(f"MSK-P-{p}"[:16], str(priority)[:64])


SUPERRES = private("MSK-F-SUPERRES", "Super-resolved series")
CONSISTENCY_ERROR = private("MSK-M-CONSIST", "Data consistency relative error")
CONSISTENCY = private("MSK-C-CONSIST", "Data consistency check")
PASSED = private("MSK-V-PASSED", "Passed")
FAILED = private("MSK-V-FAILED", "Failed")

COMMENT = dcm("121106", "Comment")
SERIES_UID = dcm("112002", "Series Instance UID")
ILLUSTRATION = dcm("121200", "Illustration of ROI")
IMAGING_PROCEDURE = sct("363679005", "Imaging procedure")
DEVICE = dcm("121007", "Device")

# ---- SEG ---------------------------------------------------------------------
SEG_CATEGORY = sct("49755003", "Morphologically Abnormal Structure")
# the level SEG (lumbar_spine.levels): anatomical structures (CID 7150), vertebrae as in the DICOM anatomic
# master list (CID 7151 / 7304); a disc is the intervertebral disc structure with its level as the region
SEG_ANATOMY_CATEGORY = sct("123037004", "Anatomical Structure")
VERTEBRA = {
    "L1": sct("66794005", "L1 vertebra"),
    "L2": sct("14293000", "L2 vertebra"),
    "L3": sct("36470004", "L3 vertebra"),
    "L4": sct("11994002", "L4 vertebra"),
    "L5": sct("49668003", "L5 vertebra"),
}
AI_FAMILY = dcm("123110", "Artificial Intelligence")

# ---- equipment / derivation ------------------------------------------------------
PROCESSING_EQUIPMENT = dcm("109102", "Processing Equipment")
SPATIAL_RESAMPLING = dcm("113085", "Spatial resampling")
SOURCE_IMAGE_FOR_PROCESSING = dcm("121322", "Source image for image processing operation")

"""Algorithm identification (IHE AI Results): which model, which version, which weights."""

from __future__ import annotations

import datetime as dt

import highdicom as hd
from highdicom.sr import AlgorithmIdentification

from models.types import ModelInfo
from node import __version__ as NODE_VERSION
from node.results import codes

MANUFACTURER = "msknode"
MANUFACTURER_MODEL = "msknode"


def contributing_equipment(models: list[ModelInfo], when: dt.datetime | None = None) -> list[hd.ContributingEquipment]:
    """One Contributing Equipment item per model: name, version and weights hash."""
    items = []
    seen = set()
    for m in models:
        key = (m.name, m.version, m.weights_sha256)
        if key in seen:
            continue
        seen.add(key)
        desc = f"AI model {m.name} {m.version}, weights sha256 {m.weights_sha256}"
        if m.demo_weights:
            desc += ". " + m.notice
        items.append(
            hd.ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=codes.PROCESSING_EQUIPMENT,
                manufacturer_model_name=m.name[:64],
                software_versions=(m.version[:64], m.weights_sha256[:64]),
                device_serial_number=m.weights_sha256[:64] or "unknown",
                contribution_datetime=when,
                contribution_description=desc[:1024],
            )
        )
    return items


def sr_algorithm(m: ModelInfo, threshold: float | None = None) -> AlgorithmIdentification:
    params = [f"weights_sha256={m.weights_sha256}"]
    if threshold is not None:
        params.append(f"threshold={threshold:g}")
    if m.demo_weights:
        params.append("demo_weights=true")
    return AlgorithmIdentification(name=m.name, version=m.version, parameters=params)


def seg_algorithm(m: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=m.name,
        family=codes.AI_FAMILY,
        version=m.version,
        source=MANUFACTURER,
        parameters={"weights_sha256": m.weights_sha256, "saliency": "heatmap"},
    )


def node_software_versions() -> str:
    return NODE_VERSION

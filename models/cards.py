"""Model cards: ``card.json`` (read by the registry and ``msknode models list``) and ``MODEL_CARD.md``.

``write_card(folder, card)`` writes both from one dict; the Markdown is generated from the
same facts so the two never disagree. Required keys: name, version, task, anatomy,
weights_sha256, training_data, recipe, metrics, evaluation_data, reproduce (commands),
limitations (list of str). The notice "not for diagnostic use" is always included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.types import NOT_FOR_DIAGNOSTIC_USE

REQUIRED = ("name", "version", "task", "anatomy", "weights_sha256", "training_data", "recipe", "metrics",
            "evaluation_data", "reproduce", "limitations")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def markdown(card: dict[str, Any]) -> str:
    m = card["metrics"]
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        f"**Demo weights — not for diagnostic use.** {NOT_FOR_DIAGNOSTIC_USE}",
        "",
        f"- Task: {card['task']} ({card.get('description', '')}); anatomy: {card['anatomy']}",
        f"- Input: {json.dumps(card.get('input', {}))}",
        f"- Outputs: {json.dumps(card.get('outputs', {}))}",
        f"- Weights: `{card.get('weights_file', 'model.pt')}`, sha256 `{card['weights_sha256']}` (verified before use)",
        "",
        "## Training data",
        "",
        str(card["training_data"]),
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(card["recipe"], indent=2),
        "```",
        "",
        "## Evaluation",
        "",
        f"Data: {card['evaluation_data']}. Every case scored; QC refusals counted (`qc_refused`). "
        "95 % bootstrap confidence intervals.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", "## Reproduce", "", "```sh", *card["reproduce"], "```", "", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    lines += ["", f"_{NOT_FOR_DIAGNOSTIC_USE} This model is not for diagnostic use._", ""]
    return "\n".join(lines)


def write_card(folder: Path, card: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"model card lacks {', '.join(missing)}")
    card = {**card, "demo_weights": True, "notice": NOT_FOR_DIAGNOSTIC_USE}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(markdown(card))

"""Model cards: ``card.json`` (read by the registry and ``msknode models list``) and ``MODEL_CARD.md``.

``write_card(folder, card)`` writes both from one dict; the Markdown is generated from the
same facts so the two never disagree. Required keys: name, version, task, anatomy,
weights_sha256, training_data, recipe, metrics, evaluation_data, reproduce (commands),
limitations (list of str). The notice "not for diagnostic use" is always included.

``notice`` (optional) replaces the default notice for weights that learned from more than phantoms (it
must say "not for diagnostic use"); ``tables`` (optional) are rendered as Markdown tables
(``[{"title", "columns", "rows"}]``), e.g. per-source figures and the licences of the sources.

`cards_in_use` reads the cards of the weights a node would use without importing the models' code
(torch, MONAI: seconds per process), for `msknode monitor` and the web dashboard.

``real_data`` (optional) holds what the model did on real scans without labels
(``msknode evaluate MODEL --data realdir:PATH``): the command, the data and the figures
as measured, good or bad; `record_real_data` writes it into an existing card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.types import NOT_FOR_DIAGNOSTIC_USE

CARD_FILE = "card.json"
#: the repository's weights, searched after a site's folder (``settings.weights_dir``)
REPO_WEIGHTS = Path(__file__).resolve().parent / "weights"
#: the weights file of every model, in its folder ``<root>/<model name>/``
WEIGHTS_FILE = "model.pt"
#: earlier names of a model's weights file, still found in a site folder
LEGACY_WEIGHTS_FILES: dict[str, tuple[str, ...]] = {"superres": ("superres.pt",)}


def read_card(folder: Path) -> dict[str, Any]:
    """``card.json`` in ``folder`` ({} when it is absent or unreadable)."""
    try:
        card = json.loads((Path(folder) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def weights_roots(weights_dir: Path | str | None = None, *, include_repo: bool = True) -> list[Path]:
    """The folders searched for a model's weights, in order: ``weights_dir`` (a site's), then the repository's."""
    return ([Path(weights_dir)] if weights_dir else []) + ([REPO_WEIGHTS] if include_repo else [])


def find_weights(roots: list[Path], name: str, files: tuple[str, ...]) -> Path | None:
    """The first of ``files`` in ``<root>/<name>/`` of the first root holding one (None if none does)."""
    for root in roots:
        for file in files:
            p = root / name / file
            if p.is_file():
                return p
    return None


def cards_in_use(weights_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """Model name -> the card beside the weights in use, found as `models.registry.Registry` finds them
    (`find_weights` over `weights_roots`), read without importing the models' code. A model whose weights
    in use have no card is left out."""
    roots = weights_roots(weights_dir)
    names: set[str] = set()
    for root in roots:
        try:
            names.update(p.name for p in root.iterdir() if p.is_dir())
        except OSError:
            continue
    cards: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        path = find_weights(roots, name, (WEIGHTS_FILE, *LEGACY_WEIGHTS_FILES.get(name, ())))
        card = read_card(path.parent) if path is not None else {}
        if card:
            cards[name] = card
    return cards


REQUIRED = (
    "name",
    "version",
    "task",
    "anatomy",
    "weights_sha256",
    "training_data",
    "recipe",
    "metrics",
    "evaluation_data",
    "reproduce",
    "limitations",
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def _notice(card: dict[str, Any]) -> str:
    notice = str(card.get("notice") or NOT_FOR_DIAGNOSTIC_USE)
    return notice if "not for diagnostic use" in notice.lower() else f"{notice} {NOT_FOR_DIAGNOSTIC_USE}"


def _table_lines(tables: list[dict[str, Any]] | None) -> list[str]:
    lines: list[str] = []
    for t in tables or []:
        if not t.get("rows"):
            continue
        cols = list(t["columns"])
        lines += ["", f"### {t['title']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in t["rows"]]
    return lines


def markdown(card: dict[str, Any]) -> str:
    m = card["metrics"]
    notice = _notice(card)
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        (
            f"**Demo weights — not for diagnostic use.** {notice}"
            if card.get("demo_weights", True)
            else f"**Not for diagnostic use.** {notice}"
        ),
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
        f"Data: {card['evaluation_data']}. "
        + str(
            card.get("evaluation_note")
            or "Every case scored; QC refusals counted (`qc_refused`). 95 % bootstrap confidence intervals."
        ),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    lines += _table_lines(card.get("tables"))
    if card.get("licence"):
        lines += ["", "## Licence", "", str(card["licence"])]
    lines += _real_data_lines(card.get("real_data"))
    lines += ["", "## Reproduce", "", "```sh", *card["reproduce"], "```", "", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    lines += ["", f"_{notice} This model is not for diagnostic use._", ""]
    return "\n".join(lines)


_REAL_SUMMARY_KEYS = (
    "n",
    "qc_accepted",
    "qc_refused",
    "qc_reasons",
    "own_anatomy_accepted_rate",
    "positive_rate",
    "normal_accepted",
    "false_positive_rate",
    "p_finding",
    "predicted_classes",
    "accepted_rate",
    "refused_rate",
    "consistency_passed_rate",
    "consistency_error_max",
)


def _real_data_lines(real: dict[str, Any] | None) -> list[str]:
    if not real:
        return []
    lines = [
        "",
        "## On real scans (no labels)",
        "",
        str(real.get("data", "")),
        "",
        f"Measured with `{real.get('command', '')}`.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for k, v in real.get("figures", {}).items():
        if k not in ("by_source", "by_anatomy", "loso"):
            lines.append(f"| {k} | {_fmt(v)} |")
    for group in ("by_anatomy", "by_source"):
        rows = real.get("figures", {}).get(group)
        if not rows:
            continue
        lines += [
            "",
            f"| {group.replace('by_', '')} | series | QC accepted | QC refused (reasons) |",
            "|---|---|---|---|",
        ]
        for name, g in rows.items():
            lines.append(
                f"| {name} | {g['n']} | {g['qc_accepted']} | {g['qc_refused']} ({_fmt(g.get('qc_reasons', {}))}) |"
            )
    return lines


def record_real_data(folder: Path, result: dict[str, Any], *, data: str, command: str) -> dict[str, Any]:
    """Stores the figures of a realdir evaluation (per-series rows left out) in the card at ``folder``."""
    folder = Path(folder)
    card = json.loads((folder / "card.json").read_text())
    figures = {k: result[k] for k in _REAL_SUMMARY_KEYS if k in result and result[k] is not None}
    for group in ("by_anatomy", "by_source"):
        if group in result:
            figures[group] = result[group]
    card["real_data"] = {
        "data": data,
        "command": command,
        "figures": figures,
        "model_weights_sha256": result.get("weights_sha256"),
    }
    if all(k in card for k in REQUIRED):
        write_card(folder, card)
        return card
    # a card whose Markdown is written by hand: card.json updated, the section replaced or appended
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    md_path = folder / "MODEL_CARD.md"
    text = md_path.read_text() if md_path.is_file() else ""
    section = "\n".join(_real_data_lines(card["real_data"])).strip() + "\n"
    head, sep, rest = text.partition("## On real scans (no labels)")
    if sep:
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md_path.write_text(text)
    return card


def write_card(folder: Path, card: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"model card lacks {', '.join(missing)}")
    card = {"demo_weights": True, **card}
    card["notice"] = _notice(card)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(markdown(card))


def main(argv: list[str] | None = None) -> int:
    """``python -m models.cards record-real FOLDER RESULT.json --data TEXT --command TEXT``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m models.cards")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record-real", help="store a realdir evaluation (msknode evaluate ... --json) in a card")
    rec.add_argument("folder", type=Path, help="the model's weights folder (card.json, MODEL_CARD.md)")
    rec.add_argument("result", type=Path, help="the JSON printed by msknode evaluate MODEL --data realdir:PATH --json")
    rec.add_argument("--data", required=True, help="what the real series are (sources, counts)")
    rec.add_argument("--command", required=True, help="the command that produced the result")
    args = ap.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
        record_real_data(args.folder, result, data=args.data, command=args.command)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

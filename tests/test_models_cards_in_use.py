"""The cards of the weights in use, read without the models' code (`models.cards.cards_in_use`).

`msknode monitor` (run by a site's monitoring every few minutes) and the web dashboard report the
cards' figures beside the live ones; importing the registry (torch, MONAI) cost each probe ~5 s of CPU
and the web process hundreds of MB. The cards found must still be the registry's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from models.cards import REPO_WEIGHTS, cards_in_use
from models.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def _site(tmp_path: Path) -> Path:
    """A site's weights folder: its own knee.acl (weights and card), a rotator-cuff model without a card, the
    super-resolution weights under their earlier file name, and a folder without weights."""
    site = tmp_path / "site"
    acl = site / "knee.acl"
    acl.mkdir(parents=True)
    (acl / "model.pt").write_bytes(b"site weights")
    card = json.loads((REPO_WEIGHTS / "knee.acl" / "card.json").read_text())
    (acl / "card.json").write_text(json.dumps({**card, "version": "site-7"}))
    cuff = site / "shoulder.rotator_cuff"
    cuff.mkdir()
    (cuff / "model.pt").write_bytes(b"site weights, no card")
    sr = site / "superres"
    sr.mkdir()
    (sr / "superres.pt").write_bytes(b"earlier file name")
    shutil.copy(REPO_WEIGHTS / "superres" / "card.json", sr / "card.json")
    (site / "knee.meniscus").mkdir()  # no weights: the repository's are in use
    (site / "knee.meniscus" / "card.json").write_text(json.dumps({"name": "knee.meniscus", "version": "stray"}))
    return site


def test_the_cards_in_use_are_the_registrys(tmp_path):
    site = _site(tmp_path)
    for weights_dir in (None, site):
        registry = Registry(weights_dir)
        expected = {name: registry.card(name) for name in registry.names() if registry.card(name)}
        assert cards_in_use(weights_dir) == expected
    cards = cards_in_use(site)
    assert cards["knee.acl"]["version"] == "site-7"
    assert "shoulder.rotator_cuff" not in cards  # its weights in use (the site's) have no card
    assert cards["knee.meniscus"]["version"] != "stray"
    assert "superres" in cards


def test_monitoring_reads_the_cards_without_importing_torch_or_monai(tmp_path):
    site = _site(tmp_path)
    code = (
        "import json, sys\n"
        "from worklists.monitoring import load_cards\n"
        f"cards = load_cards({str(site)!r})\n"
        "print(json.dumps({'cards': sorted(cards), 'heavy': sorted(m for m in ('torch', 'monai') if m in sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(out.stdout)
    assert got["heavy"] == []
    assert got["cards"] == sorted(cards_in_use(site))

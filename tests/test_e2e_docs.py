"""The README: the two commands first, every setting with its current default, links that resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _reference():
    spec = importlib.util.spec_from_file_location("settings_reference", ROOT / "scripts" / "settings_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```\w*\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert text.index("```") < text.index("\n## ")  # before any section


def test_every_setting_is_in_the_readme_with_its_default():
    from node.settings import Settings

    ref = _reference()
    text = README.read_text()
    table = text.split(ref.BEGIN, 1)[1].split(ref.END, 1)[0]
    for name in Settings.model_fields:
        env = f"MSKNODE_{name.upper()}"
        assert f"| `{env}` |" in table, f"{env} is missing from the README configuration reference"
    for env, key, default, desc in ref.rows():
        assert desc, f"{env} has no description in scripts/settings_reference.py"
        row = f"| `{env}` | `{key}` | {default} |"
        assert row in table, f"README row of {env} is stale (run scripts/settings_reference.py --write): {row}"
    # the generated table is exactly what the README holds
    assert ref.markdown() in text


def test_readme_links_resolve_and_shipped_models_have_cards():
    from models.registry import ENTRIES, Registry

    registry = Registry()
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path = ROOT / link
        m = re.match(r"models/weights/([^/]+)/MODEL_CARD\.md$", link)
        if m and m.group(1) in ENTRIES and not registry.has_weights(m.group(1)):
            continue  # a model whose weights have not landed yet: its card comes with them
        assert path.exists(), f"README links to {link}, which does not exist"
    for name in ENTRIES:
        if registry.has_weights(name):
            assert f"models/weights/{name}/MODEL_CARD.md" in text, f"{name} ships without a README model-card link"

"""The documentation: the README's two commands first, every setting with its current default in
docs/configuration.md, links that resolve in every document, a card link for every shipped model."""

from __future__ import annotations

import importlib.util
import re

import pytest
from support.env import ROOT

pytestmark = pytest.mark.unit

README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
MODELS = ROOT / "docs" / "models.md"
DOCUMENTS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


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


def test_readme_links_every_document():
    text = README.read_text()
    for doc in DOCUMENTS[1:]:
        assert f"]({doc.relative_to(ROOT)})" in text, f"the README does not link {doc.relative_to(ROOT)}"


def test_every_setting_is_in_the_configuration_reference_with_its_default():
    from node.settings import Settings

    ref = _reference()
    text = CONFIGURATION.read_text()
    table = text.split(ref.BEGIN, 1)[1].split(ref.END, 1)[0]
    for name in Settings.model_fields:
        env = f"MSKNODE_{name.upper()}"
        assert f"| `{env}` |" in table, f"{env} is missing from the configuration reference"
    for env, key, default, desc in ref.rows():
        assert desc, f"{env} has no description in scripts/settings_reference.py"
        row = f"| `{env}` | `{key}` | {default} |"
        assert row in table, f"configuration row of {env} is stale (run scripts/settings_reference.py --write): {row}"
    # the generated table is exactly what the document holds
    assert ref.markdown() in text


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    from models.registry import ENTRIES, Registry

    registry = Registry()
    text = doc.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    if doc in (README, MODELS):
        assert links
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path = (doc.parent / link).resolve()
        m = re.search(r"models/weights/([^/]+)/MODEL_CARD\.md$", link)
        if m and m.group(1) in ENTRIES and not registry.has_weights(m.group(1)):
            continue  # a model whose weights have not landed yet: its card comes with them
        assert path.exists(), f"{doc.relative_to(ROOT)} links to {link}, which does not exist"


def test_shipped_models_have_card_links():
    from models.registry import ENTRIES, Registry

    registry = Registry()
    for doc, prefix in ((README, ""), (MODELS, "../")):
        text = doc.read_text()
        for name in ENTRIES:
            if registry.has_weights(name):
                link = f"{prefix}models/weights/{name}/MODEL_CARD.md"
                assert f"]({link})" in text, f"{name} ships without a model-card link in {doc.relative_to(ROOT)}"

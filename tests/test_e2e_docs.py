"""The documentation: the README's two commands first, every setting with its current default in
docs/configuration.md (both forms, both ways), every command and option the documents name, links
that resolve in every document, a card link for every shipped model, the commands an admin copies
from docs/operations.md."""

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


# ---- settings in both forms, both ways -----------------------------------------------------------
#: MSKNODE_* names in the documents that are not settings of the node, and what they are
NOT_SETTINGS = {
    "MSKNODE_CONFIG": "the settings file (msknode --config)",
    "MSKNODE_WORKERS": "docker compose: replicas of the worker service",
    "MSKNODE_MODALITY": "the Orthanc auto-routing script: msknode's DicomModalities name",
    "MSKNODE_ROUTE_MODALITIES": "the Orthanc auto-routing script: modalities forwarded",
    "MSKNODE_REALDATA": "tests: a folder of real studies",
}


def _configuration_block():
    ref = _reference()
    return ref, CONFIGURATION.read_text().split(ref.BEGIN, 1)[1].split(ref.END, 1)[0]


def test_every_documented_setting_exists():
    from node.settings import Settings

    settings = {f"MSKNODE_{n.upper()}" for n in Settings.model_fields}
    for doc in DOCUMENTS:
        for name in set(re.findall(r"\bMSKNODE_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text())):
            assert name in settings or name in NOT_SETTINGS, (
                f"{doc.relative_to(ROOT)} names {name}, which is no setting"
            )
    _, block = _configuration_block()
    keys = set(re.findall(r"^\| `MSKNODE_\w+` \| `(\w+)` \|", block, re.M))
    assert keys == set(Settings.model_fields)


def test_the_documented_settings_file_holds_every_key_and_loads(tmp_path, monkeypatch):
    import tomllib

    from node.settings import Settings, load_settings
    from support.env import isolate_env

    ref, block = _configuration_block()
    toml_text = re.search(r"```toml\n(.*?)```", block, re.S).group(1)
    keys = set(tomllib.loads(toml_text)["msknode"])
    commented = set(re.findall(r"^# (\w+) = ", toml_text, re.M))
    assert keys | commented == set(Settings.model_fields), "the settings file example is not every setting"
    path = tmp_path / "msknode.toml"
    path.write_text(toml_text)
    isolate_env(monkeypatch, MSKNODE_CONFIG=path)
    from_file = load_settings()
    for name, value in ref.EXAMPLES.items():
        got = getattr(from_file, name)
        if name == "destinations":
            got = [d.model_dump(exclude_defaults=True) | {"type": d.type} for d in got]
        assert got == value, name

    # the environment form of the same values, as the table shows them, gives the same settings
    env = dict(re.findall(r"`(MSKNODE_\w+)='([^']*)'`", block))
    assert set(env) == {f"MSKNODE_{n.upper()}" for n in ref.EXAMPLES}
    isolate_env(monkeypatch, **env)
    from_env = load_settings()
    for name in ref.EXAMPLES:
        assert getattr(from_env, name) == getattr(from_file, name), name


# ---- every command and option the documents name exists ------------------------------------------
def _commands_in_docs():
    """(document, text) of every ``msknode ...`` in inline code or in a code block."""
    for doc in DOCUMENTS:
        text = doc.read_text()
        spans = re.findall(r"```[\w-]*\n(.*?)```", text, re.S)
        pieces = [line for block in spans for line in block.splitlines()]
        pieces += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
        for piece in pieces:
            m = re.search(r"(?:^|[\s$(])msknode ((?:--?[\w-]+|[a-z][\w-]*)(?:.*))", piece.split("#")[0].strip())
            if m:
                yield doc, m.group(1)


def _walk(parser, tokens, doc, text):
    root = parser
    skip = False
    for raw in tokens:
        for token in filter(None, re.split(r"[\[\]|]", raw)):
            if skip:  # the value of the option before
                skip = False
                continue
            sub = _subcommands(parser)
            if token.startswith("--"):
                option = token.split("=")[0]
                known = {o: a for p in (root, parser) for a in p._actions for o in a.option_strings}
                assert option in known, f"{doc.name}: `msknode {text}`: {option} is not an option of {parser.prog}"
                skip = "=" not in token and known[option].nargs != 0
            elif token in sub:
                parser = sub[token]
            elif parser is not root and token in _subcommands(root):
                parser = _subcommands(root)[token]  # `listen | worker | web`: alternatives
            elif not _subcommands(parser):
                continue  # an argument (a file, an id, a value)
            elif re.fullmatch(r"[a-z][a-z-]*", token):
                raise AssertionError(f"{doc.name}: `msknode {text}`: {token} is not a command of {parser.prog}")


def _subcommands(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def test_every_documented_command_and_option_exists():
    from node.cli import build_parser

    parser = build_parser()
    seen = 0
    for doc, text in _commands_in_docs():
        _walk(parser, text.split(), doc, text)
        seen += 1
    assert seen > 20


# ---- what an admin copies from docs/operations.md ------------------------------------------------
OPERATIONS = ROOT / "docs" / "operations.md"


def test_echoscu_in_the_docs_names_a_calling_ae_title():
    for doc in DOCUMENTS:
        for line in re.findall(r"echoscu[^`\n]*", doc.read_text()):
            assert "-aet " in line, f"{doc.relative_to(ROOT)}: `{line}` is refused once an allow-list is set"


def test_the_documented_phantom_command_writes_a_study(tmp_path):
    import json
    import shlex
    import subprocess
    import sys

    line = next(x for x in OPERATIONS.read_text().splitlines() if x.startswith("python -m models.phantoms study "))
    args = shlex.split(line)
    out_dir = args[5]
    args[5] = str(tmp_path / "study")
    r = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts and all(n > 0 for n in counts.values())
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == sorted(counts)
    # the storescu line sends what the generator wrote
    assert any(x.startswith("storescu -aet ") and x.endswith(out_dir) for x in OPERATIONS.read_text().splitlines())

"""The front door and the docs stay true: the README is short and starts with the two commands, every link and
every file, recipe key and make target the pages name exists, and the configuration reference is the schema's."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_named_file_exists(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name}: link to {target}"
    for path in set(
        re.findall(r"`((?:engine|kernels|launch|configs|tests|docs)/[\w./-]+\.(?:py|yaml|sh|sbatch|md))`", text)
    ):
        assert (REPO / path).exists(), f"{page.name} names {path}"
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    for target in set(re.findall(r"`make ([\w-]+)", text)):
        assert target in targets, f"{page.name} names make {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_recipe_key_the_pages_name_exists(page):
    from biodistill.engine import config

    recipe = config.Recipe()
    sections = [f.name for f in dataclasses.fields(recipe) if dataclasses.is_dataclass(getattr(recipe, f.name))]
    known = {f"{name}.{f.name}" for name in sections for f in dataclasses.fields(getattr(recipe, name))}
    text = page.read_text(encoding="utf-8")
    # as a flag (--train.max_steps 50) or a key in backticks (`student.teacher_layers`)
    keys = r"(?:`|--)((?:teacher|student|data|losses|optim|train|deepspeed)\.[a-z_]+)(?=[`\s=])(?<!\.tsv)(?<!\.json)"
    named = set(re.findall(keys, text))
    assert not {k for k in named if k not in known}, page.name


def test_configuration_reference_is_the_schema():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import reference
    finally:
        sys.path.pop(0)
    assert (REPO / "docs" / "configuration.md").read_text(encoding="utf-8") == reference.page(), (
        "docs/configuration.md differs from engine/config.py: run python docs/reference.py"
    )

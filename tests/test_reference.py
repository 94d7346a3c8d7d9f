"""docs/configuration.md is what the config dataclasses generate: an option added, renamed or documented anew
without regenerating the page fails here."""

from __future__ import annotations

import dataclasses

from gp_lightning.cli import REFERENCE_PAGE as PAGE
from gp_lightning.cli import reference_page as generate
from gp_lightning.config import PruneConfig
from gp_lightning.finetune.config import FinetuneConfig


def test_the_committed_configuration_reference_is_the_generated_one() -> None:
    assert PAGE.read_text(encoding="utf-8") == generate(), (
        "docs/configuration.md is stale: run `gp-lightning config-reference` and commit it")


def test_every_key_of_both_workflows_is_on_the_page_with_its_documentation() -> None:
    page = generate()
    for config_class in (PruneConfig, FinetuneConfig):
        for _, group in config_class.group_fields():
            for field in dataclasses.fields(group):
                row = next((line for line in page.splitlines() if line.startswith(f"| `{field.name}` / ")), "")
                assert row.count("|") >= 5 and not row.endswith("|  |"), field.name  # documented, not empty

"""The README's recipe reference lists every key, and every accelerate config parses."""

import dataclasses

import pytest
import yaml
from conftest import ROOT

from finetune.config import Recipe


def recipe_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Recipe):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


def test_readme_documents_every_recipe_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in recipe_keys() if f"`{k}`" not in readme]
    assert not missing, f"README recipe reference lacks: {missing}"


CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")
    config = load_config_from_file(str(path))  # accelerate's own loader validates the fields
    assert config.num_processes == data["num_processes"]
    if data["distributed_type"] == "FSDP":
        assert data["fsdp_config"]["fsdp_version"] == 2

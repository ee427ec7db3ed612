"""The documents that list what the code defines stay equal to it."""

from pathlib import Path

from gala_scale.config import describe

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_reference_lists_what_help_config_prints():
    text = (ROOT / "docs" / "configuration.md").read_text()
    block = text.split("`python -m gala_scale.train --help-config` prints this list:", 1)[1]
    listed = block.split("```", 2)[1].strip().splitlines()
    assert listed == describe(), "regenerate it: python -m gala_scale.train --help-config"

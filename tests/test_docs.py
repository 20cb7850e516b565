"""The README must not drift from the code it documents."""

from __future__ import annotations

import re

from worker.settings import Settings, markdown_table
from worker.store import keys
from worker.testing import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()


def test_readme_lists_every_setting_as_the_code_describes_it():
    for row in markdown_table().splitlines()[2:]:
        assert row in README, f"README settings table is stale: run python -m worker.settings\n{row}"


def readme_section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_key_layout_is_the_table_the_code_declares():
    table = "\n".join(line for line in readme_section("Redis key layout").splitlines() if line.startswith("|"))
    assert table == keys.markdown_table(), "README key layout is stale: run python -m worker.store"


def test_readme_first_screen_has_the_two_commands_and_they_exist():
    first_screen = "\n".join(README.splitlines()[:12])
    commands = re.findall(r"^bash (scripts/\S+)", first_screen, flags=re.M)
    assert commands == ["scripts/demo.sh", "scripts/test.sh"]
    assert all((PROJECT_ROOT / c).is_file() for c in commands)


def test_ci_runs_the_readme_test_command():
    assert "bash scripts/test.sh" in (PROJECT_ROOT / ".ci" / "run").read_text()


def test_every_setting_has_an_env_name_in_the_readme():
    for name in Settings.model_fields:
        assert f"ALLINONE_{name.upper()}" in README

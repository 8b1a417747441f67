"""The documented configuration is the configuration the code reads."""

from birbnest.env import BASE_DIR
from tools import configdoc


def test_env_example_lists_every_variable_with_its_default() -> None:
    assert (BASE_DIR / ".env.example").read_text() == configdoc.env_example(), "run `python -m tools.configdoc write`"


def test_readme_configuration_table_is_current() -> None:
    readme = (BASE_DIR / "README.md").read_text()
    assert configdoc.readme_with_table(readme) == readme, "run `python -m tools.configdoc write`"

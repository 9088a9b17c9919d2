"""The package's public names (`mixsd.PUBLIC`): each is defined where the table says, README's command
table names them, and `import mixsd` loads no model library."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mixsd

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", sorted(mixsd.PUBLIC))
def test_each_public_name_is_defined_in_its_module(name):
    assert getattr(mixsd, name).__module__ == mixsd.PUBLIC[name]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'mixer'"):
        mixsd.mixer  # noqa: B018


def test_the_readme_names_library_functions_that_exist():
    named = re.findall(r"`mixsd\.([A-Za-z_][\w.]*)", README.read_text(encoding="utf-8"))
    public = [n for n in named if "." not in n]
    assert public, "README's command table names the library functions"
    assert set(public) <= set(mixsd.PUBLIC) | {"corpora"}, set(public) - set(mixsd.PUBLIC)


def test_importing_the_package_loads_no_model_library():
    code = "import sys, mixsd; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""README.md's layout section names every module of the package: a newcomer reads it to find where things are."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    modules = sorted(p.name for p in (ROOT / "vithybrid_fast").glob("*.py") if p.name != "__init__.py")
    modules += sorted(p.name for p in (ROOT / "kernels").glob("[!_]*.py"))
    assert [name for name in modules if name not in layout] == []

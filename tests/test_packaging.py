"""The installed package holds every subpackage and the files read at run time (a non-editable
install once lacked goldstone_cli.distributed: pyproject lists the packages by hand)."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_and_kernel_source_is_installed():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "goldstone_cli").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    from goldstone_cli.kernels import native

    assert "*.c" in cfg["package-data"]["goldstone_cli.kernels"]
    assert all((Path(native.__file__).parent / s).suffix == ".c" for s in native.SOURCES)

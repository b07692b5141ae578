"""scripts/import_picture.py draws the boundaries the import contracts enforce: checked on the
real tree, so the picture in the docs cannot say what the code does not do."""

from __future__ import annotations

from tests.chart._scripts import load_script


def test_the_picture_shows_the_package_boundaries() -> None:
    picture = load_script("import_picture").picture()
    assert picture["perseus_hooks"] == (set(), set())  # a leaf, standard library only
    assert picture["perseus_profiles"] == ({"perseus_hooks"}, set())
    shipped = [p for p in picture if not p.startswith("perseus_sim")]
    assert all("perseus_sim" not in picture[p][0] for p in shipped)
    assert "perseus_sim" in picture and "perseus_operator" in picture["perseus_sim"][0]
    assert picture["perseus_operator.planner"][1] == {"highspy", "numpy"}
    assert "pynvml" in picture["perseus_sidecar.gpu"][1]
    assert "pynvml" not in picture["perseus_sidecar"][1] | picture["perseus_operator"][1]

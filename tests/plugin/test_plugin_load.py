"""The plugin installs from the packaged zip and registers its provider, menu and toolbar."""

from __future__ import annotations

import configparser
from pathlib import Path

EXPECTED = {
    "labellinggrid",
    "quickpreview",
    "trainmodel",
    "changeprobability",
    "pseudolabels",
    "traindetector",
    "detectchanges",
    "runchain",
    "vectorize",
    "evaluate",
    "exportdetector",
    "suggesttiles",
}


def test_plugin_comes_from_the_unpacked_zip(plugin, plugins_dir: Path) -> None:
    import kdmsi_qgis
    from kdmsi_qgis import settings

    assert Path(kdmsi_qgis.__file__).resolve().parent == (plugins_dir / "kdmsi_qgis").resolve()
    # the worker finds the engine shipped inside the plugin folder
    assert settings.engine_root() == (plugins_dir / "kdmsi_qgis").resolve()


def test_provider_lists_every_algorithm(plugin) -> None:
    from qgis.core import QgsApplication

    provider = QgsApplication.processingRegistry().providerById("kdmsi")
    assert provider is not None and provider is plugin.provider
    names = {alg.name() for alg in provider.algorithms()}
    assert names == EXPECTED
    for alg in provider.algorithms():
        assert alg.displayName() and alg.group()
        assert len(alg.shortHelpString()) > 150, alg.id()
        assert not alg.icon().isNull()
        for parameter in alg.parameterDefinitions():
            assert parameter.name() == parameter.name().upper(), (alg.id(), parameter.name())


def test_menu_toolbar_and_dock_action(plugin, iface) -> None:
    actions = [a for group in iface.menus.values() for a in group]
    texts = {a.text() for a in actions}
    assert {"KD-MSI change detection", "Check environment"} <= texts
    assert any(not a.icon().isNull() for a in actions)
    assert iface.toolbars and iface.toolbars[0].actions()


def test_metadata_has_what_plugins_qgis_org_requires(plugins_dir: Path) -> None:
    parser = configparser.ConfigParser()
    parser.read(plugins_dir / "kdmsi_qgis" / "metadata.txt", encoding="utf-8")
    general = parser["general"]
    for key in (
        "name",
        "qgisMinimumVersion",
        "description",
        "about",
        "version",
        "author",
        "email",
        "repository",
        "tracker",
        "homepage",
        "tags",
        "category",
        "icon",
        "experimental",
    ):
        assert general.get(key, "").strip(), key
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["hasProcessingProvider"] == "yes"
    assert (plugins_dir / "kdmsi_qgis" / general["icon"]).is_file()
    assert (plugins_dir / "kdmsi_qgis" / "LICENSE").is_file()


def test_plugin_never_imports_torch(plugins_dir: Path) -> None:
    """Every plugin module imports in a fresh QGIS Python without pulling in torch."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib\n"
        f"sys.path.insert(0, {str(plugins_dir)!r})\n"
        "import kdmsi_qgis\n"
        "for m in pkgutil.walk_packages(kdmsi_qgis.__path__, 'kdmsi_qgis.'):\n"
        "    if not m.name.startswith('kdmsi_qgis.kdmsi_engine'):\n"
        "        importlib.import_module(m.name)\n"
        "assert 'kdmsi_qgis.dock' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'the plugin imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unload_removes_everything_and_initgui_restores_it(plugin, iface) -> None:
    from qgis.core import QgsApplication

    registry = QgsApplication.processingRegistry()
    plugin.unload()
    try:
        assert registry.providerById("kdmsi") is None
        assert not [a for group in iface.menus.values() for a in group]
        assert plugin.dock is None
    finally:
        plugin.initGui()
    assert registry.providerById("kdmsi") is not None
    assert len(registry.providerById("kdmsi").algorithms()) == len(EXPECTED)

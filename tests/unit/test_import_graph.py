"""The one door, checked on the package's imports (scripts/import_graph.py)."""

import importlib.util

import pytest

from tests.servers import ROOT


@pytest.fixture(scope="module")
def import_graph():
    spec = importlib.util.spec_from_file_location(
        "import_graph", ROOT / "scripts" / "import_graph.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("functions", [False, True], ids=["module", "functions"])
def test_the_package_keeps_one_door(import_graph, functions):
    """Blueprints side by side, only the door imports the client, the error
    mapper imports nothing with state, no dev tool inside the package."""
    assert import_graph.problems(import_graph.graph(functions)) == []


def test_the_graph_sees_imports_inside_functions_only_when_asked(import_graph):
    module_level = import_graph.graph(functions=False)
    everything = import_graph.graph(functions=True)
    assert "llm_service.health" not in module_level["llm_service"]
    assert "llm_service.health" in everything["llm_service"]

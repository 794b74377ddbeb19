"""Test helper: the functions a lab notebook defines, without running its check calls."""

import itertools
import linecache

from vramlab.notebooks import source

_CELLS = itertools.count()


def defined_in(nb: dict, needle: str, check_module: str, preamble: str = "") -> dict:
    """Run the code cells that contain ``needle``, minus lines calling ``check_module``; return their namespace."""
    scope: dict = {}
    exec(preamble, scope)
    for cell in nb["cells"]:
        text = source(cell)
        if cell["cell_type"] == "code" and needle in text:
            code = "\n".join(line for line in text.splitlines() if not line.startswith(f"{check_module}.")) + "\n"
            name = f"<notebook cell {next(_CELLS)}>"  # registered, so inspect.getsource works as in Jupyter
            linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
            exec(compile(code, name, "exec"), scope)
    return scope

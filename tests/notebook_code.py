"""Test helper: the functions a lab notebook defines, without running its check calls."""

from vramlab.notebooks import source


def defined_in(nb: dict, needle: str, check_module: str, preamble: str = "") -> dict:
    """Run the code cells that contain ``needle``, minus lines calling ``check_module``; return their namespace."""
    scope: dict = {}
    exec(preamble, scope)
    for cell in nb["cells"]:
        text = source(cell)
        if cell["cell_type"] == "code" and needle in text:
            exec("\n".join(line for line in text.splitlines() if not line.startswith(f"{check_module}.")), scope)
    return scope

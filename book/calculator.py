"""The website's live calculator page (issue 28): its Markdown, and the files it loads from the
site itself, the Pyodide runtime (from the ``pyodide`` npm package) and the vramlab wheel.

``npm pack`` fetches the runtime's package from the npm registry once into ``build/pyodide``;
nothing is fetched by the page from any host but the site.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PYODIDE_VERSION = "314.0.8"
RUNTIME_FILES = ("pyodide.mjs", "pyodide.asm.mjs", "pyodide.asm.wasm", "python_stdlib.zip", "pyodide-lock.json")


def runtime(cache: Path) -> Path:
    """The folder holding the Pyodide runtime files, unpacked from the npm package (fetched once)."""
    folder = cache / PYODIDE_VERSION
    if all((folder / name).is_file() for name in RUNTIME_FILES):
        return folder
    if not shutil.which("npm"):
        raise SystemExit("book: the calculator needs the pyodide npm package: install npm (Node.js), then rerun")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"pyodide@{PYODIDE_VERSION}", "--pack-destination", tmp, "--silent"],
                       check=True, capture_output=True)  # fmt: skip
        with tarfile.open(next(Path(tmp).glob("pyodide-*.tgz"))) as tar:
            folder.mkdir(parents=True, exist_ok=True)
            for name in RUNTIME_FILES:
                source = tar.extractfile(f"package/{name}")
                assert source is not None, name
                (folder / name).write_bytes(source.read())
    return folder


def install(site: Path, runtime_folder: Path, wheel: Path) -> None:
    """Copy the runtime and the wheel under the built site's ``_static``."""
    target = site / "_static" / "pyodide"
    target.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_FILES:
        shutil.copy2(runtime_folder / name, target / name)
    wheels = site / "_static" / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    shutil.copy2(wheel, wheels / wheel.name)


def embed(nb: object, wheel_name: str, version: str) -> bool:
    """Put the live calculator in place of the static view that the notebook's memory
    calculator cell shows (chapter 02's page); return whether there was one."""
    for cell in getattr(nb, "cells", []):
        for output in cell.get("outputs", []):
            page = output.get("data", {}).get("text/html", "")
            if "vramlab-calculator-fallback" in page:
                output["data"]["text/html"] = form(wheel_name, version, "../_static/")
                return True
    return False


def _options(values: list[str], selected: str) -> str:
    return "".join(
        f'<option value="{html.escape(v)}"{" selected" if v == selected else ""}>{html.escape(v)}</option>'
        for v in values
    )


def form(wheel_name: str, version: str, static: str = "_static/") -> str:
    """The calculator's HTML: the form, its outputs and the script; ``static`` is the site's
    ``_static/`` folder relative to the page that shows it."""
    from vramlab.hardware import GPUS
    from vramlab.models import REGISTRY
    from vramlab.recipes import OPTIMIZERS, RECIPES

    return f"""<div id="vramlab-calc" data-static="{static}" data-wheel="{wheel_name}" data-version="{version}">
<p id="calc-status">This calculator runs Python in your browser: it needs JavaScript.</p>
<form id="calc-form" onsubmit="return false">
<label>Model <select name="model">{_options(list(REGISTRY), "llama-2-7b")}</select></label>
<label>or paste a config.json <textarea name="config" rows="3" cols="50"></textarea></label><br>
<label>Batch <input name="batch" type="number" min="1" value="1"></label>
<label>Sequence <input name="seq" type="number" min="1" value="1024"></label>
<label>Recipe <select name="recipe">{_options(list(RECIPES), "fp32")}</select></label>
<label>Optimizer <select name="optimizer">{_options(list(OPTIMIZERS), "adamw")}</select></label><br>
<label><input name="checkpointing" type="checkbox"> activation checkpointing</label>
<label><input name="inference" type="checkbox"> inference (a prefill)</label>
<label>LoRA rank <input name="lora" type="number" min="1"></label>
<label>QLoRA rank <input name="qlora" type="number" min="1"></label><br>
<label>GPU <select name="gpu">{_options(list(GPUS), "A100 80GB")}</select></label>
<label>GPUs <input name="gpus" type="number" min="1" value="1"></label>
</form>
<div id="calc-out"></div>
<pre id="calc-json" hidden></pre>
</div>
<script src="{static}calculator.js" defer></script>"""


def page(wheel_name: str, version: str) -> str:
    """The calculator page's Markdown."""
    return "\n".join(
        [
            "# Memory calculator",
            "",
            "The course's estimator, `vramlab estimate` and `vramlab fit`, running in your browser: the same "
            "Python as the command (no second formula), loaded from this site with Pyodide. The numbers are the "
            "formula's, checked against dry runs in the README; change a field and they follow. The page's "
            "address keeps the inputs, so a link reproduces the answer.",
            "",
            form(wheel_name, version),
            "",
        ]
    )

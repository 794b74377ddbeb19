"""The website's calculator, in Python: what the page shows, computed by the ``vramlab`` command.

The calculator page (``book/static/calculator.js``) runs this module in the reader's browser
through Pyodide. It turns the form's fields into the arguments of ``vramlab estimate`` and
``vramlab fit`` and runs the command's own code on them, so the page's numbers are the CLI's
by construction, and its errors are the library's sentences. Imports no torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

from .hardware import GPUS, fits

FIELDS = ("model", "batch", "seq", "recipe", "optimizer", "checkpointing", "inference", "lora", "qlora", "gpu", "gpus")
CONFIG_PATH = "/tmp/pasted/config.json"  # the CLI names a config.json by its folder: "pasted"


def argv_for(query: dict[str, str], command: str = "estimate", config_path: str | None = None) -> list[str]:
    """The ``vramlab`` arguments (with ``--json``) for the page's fields ``query`` (strings, as
    in the page's URL). ``config_path`` replaces the model by a pasted config.json."""
    argv = [command]
    argv += ["--config", config_path] if config_path else [query.get("model") or "gpt2"]
    if command == "fit":
        argv += ["--gpu", _gpu(query)]
    inference = query.get("inference") in ("1", "true", "on")
    names = ["batch", "seq"] + ([] if query.get("qlora") else ["recipe"])  # QLoRA's recipe and optimizer are fixed
    if not (query.get("qlora") or inference):  # a prefill has no optimizer
        names.append("optimizer")
    for name in names:
        if query.get(name) and not (command == "fit" and name == "batch"):
            argv += [f"--{name}", str(query[name])]
    for flag in ("checkpointing", "inference"):
        if query.get(flag) in ("1", "true", "on"):
            argv.append(f"--{flag}")
    for rank in ("qlora", "lora"):
        if query.get(rank):
            argv += [f"--{rank}", str(query[rank])]
    if command == "estimate" and not _one_gpu(query):  # the CLI judges the count
        argv += ["--gpus", str(query["gpus"]), "--zero", "3"]
    return [*argv, "--json"]


def _one_gpu(query: dict[str, str]) -> bool:
    return str(query.get("gpus") or "1").strip() == "1"


def _gpu(query: dict[str, str]) -> str:
    """The card's size as the CLI takes it: a name of :data:`GPUS` becomes its bytes."""
    card = query.get("gpu") or "A100 80GB"
    return f"{GPUS[card]}B" if card in GPUS else card


def run(argv: list[str]) -> dict[str, Any]:
    """``vramlab ARGV`` in this process: its JSON, or ``{"error": the line it prints}``."""
    from .cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse: a malformed number
            code = stop.code
    if code:
        return {"error": err.getvalue().strip().removeprefix("vramlab: error: ")}
    return json.loads(out.getvalue())


def answer(query: dict[str, str], config_text: str | None = None) -> dict[str, Any]:
    """Everything the page shows for ``query``: the estimate, the smallest card of
    :data:`GPUS` its peak fits (one GPU; the CLI's 512 MiB headroom), and the largest batch on
    the chosen card. ``config_text`` is a pasted config.json. On a bad input: ``{"error": ...}``
    with the library's sentence."""
    path = None
    if config_text and config_text.strip():
        path = CONFIG_PATH
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text)
    argv = argv_for(query, "estimate", path)
    estimate = run(argv)
    if "error" in estimate:
        return {"argv": argv, "error": estimate["error"]}
    result: dict[str, Any] = {"argv": argv, "estimate": estimate}
    single = _one_gpu(query)
    result["smallest_gpu"] = (
        next(
            (name for name, size in sorted(GPUS.items(), key=lambda kv: kv[1]) if fits(estimate["peak_bytes"], size)),
            None,
        )
        if single
        else None
    )
    if not query.get("qlora") and single:
        fit = run(argv_for(query, "fit", path))
        result["fit"] = fit
    return result


def answer_json(query_json: str, config_text: str = "") -> str:
    """:func:`answer` from and to JSON text: the call the page makes through Pyodide."""
    return json.dumps(answer(json.loads(query_json), config_text or None))

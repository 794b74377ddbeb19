"""vramlab.webcalc: the website calculator's Python (issue 28); the browser side is in tests_site."""

from __future__ import annotations

import json
import subprocess
import sys

from vramlab.cli import main
from vramlab.hardware import GPUS, fits
from vramlab.webcalc import answer, answer_json, argv_for


def _cli(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_fields_become_the_commands_arguments():
    query = {"model": "llama-2-7b", "batch": "2", "seq": "2048", "recipe": "amp-bf16", "checkpointing": "1",
             "gpu": "H100 80GB"}  # fmt: skip
    assert argv_for(query) == ["estimate", "llama-2-7b", "--batch", "2", "--seq", "2048", "--recipe", "amp-bf16",
                               "--checkpointing", "--json"]  # fmt: skip
    assert argv_for(query, "fit") == ["fit", "llama-2-7b", "--gpu", f"{GPUS['H100 80GB']}B", "--seq", "2048",
                                      "--recipe", "amp-bf16", "--checkpointing", "--json"]  # fmt: skip
    assert argv_for({"model": "gpt2", "gpus": "8"})[-5:] == ["--gpus", "8", "--zero", "3", "--json"]
    assert "--recipe" not in argv_for({"model": "llama-2-7b", "recipe": "bf16", "qlora": "16"})  # QLoRA's is fixed
    assert "--optimizer" not in argv_for({"model": "gpt2", "optimizer": "sgd", "inference": "1"})  # no optimizer


def test_the_answer_is_the_clis_and_the_smallest_card_fits(capsys):
    query = {"model": "qwen2.5-0.5b", "batch": "4", "seq": "2048", "recipe": "amp-bf16", "gpu": "L4 (24 GB)"}
    shown = answer(query)
    expected = _cli(["estimate", "qwen2.5-0.5b", "--batch", "4", "--seq", "2048", "--recipe", "amp-bf16", "--json"],
                    capsys)  # fmt: skip
    assert shown["estimate"] == expected
    fitting = [name for name, size in GPUS.items() if fits(expected["peak_bytes"], size)]
    assert shown["smallest_gpu"] == min(fitting, key=GPUS.get)
    fit = _cli(["fit", "qwen2.5-0.5b", "--gpu", "24GiB", "--seq", "2048", "--recipe", "amp-bf16", "--json"], capsys)
    assert shown["fit"]["largest_batch"] >= 1 and shown["fit"]["gpu_bytes"] == GPUS["L4 (24 GB)"] != fit["gpu_bytes"]


def test_errors_are_the_librarys_sentence(capsys):
    shown = json.loads(answer_json(json.dumps({"model": "gpt2", "seq": "4096"})))
    assert main(["estimate", "gpt2", "--seq", "4096"]) == 2
    assert shown == {"argv": argv_for({"model": "gpt2", "seq": "4096"}),
                     "error": capsys.readouterr().err.strip().removeprefix("vramlab: error: ")}  # fmt: skip
    pasted = answer({}, json.dumps({"model_type": "mamba"}))
    assert "mamba" in pasted["error"]
    assert "LoRA" in answer({"model": "llama-2-7b", "lora": "8"})["error"]  # dry run only: refused, not guessed
    assert "batch" in answer({"model": "gpt2", "batch": "0"})["error"]
    assert "--gpus must be 1 or more" in answer({"model": "gpt2", "gpus": "0"})["error"]  # as typed in an address
    assert "invalid int value: 'two'" in answer({"model": "gpt2", "gpus": "two"})["error"]


def test_the_calculator_imports_no_torch():
    code = ("import sys\nfor m in ('torch', 'numpy', 'transformers', 'matplotlib'): sys.modules[m] = None\n"
            "from vramlab.webcalc import answer_json\nprint(answer_json('{\"model\": \"llama-2-7b\"}'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["estimate"]["model"] == "llama-2-7b"

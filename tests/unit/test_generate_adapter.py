"""`orbit generate --adapter`: a PEFT adapter dir (as the trainer's checkpoints hold it) served on
the base. Greedy completions with the adapter equal those of a checkpoint with the adapter
merged into its weights, and differ from the base's; a checkpoint dir works as well as its
`adapter/`; a bad adapter is one line on stderr, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_policy import save_tiny_policy

from orbit.adapters.inject import AdapterConfig, inject_adapters
from orbit.adapters.merge import merged_state_dict
from orbit.entrypoints.generate import main
from orbit.models.loader import load_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen_adapter")
    base = save_tiny_policy(root / "base")
    model, _ = load_model(base, dtype=torch.float32, device="cpu")
    aset = inject_adapters(model, AdapterConfig(r=4, alpha=8.0, dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in aset.modules.values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.5)
    ckpt = root / "checkpoints" / "step_000003"
    aset.save_peft(ckpt / "adapter", base_model_name_or_path=str(base))
    merged = root / "merged"
    shutil.copytree(base, merged)
    weights = load_file(str(merged / "model.safetensors"))
    for name, w in merged_state_dict(aset, slot=0, dtype=torch.float32).items():
        assert name in weights, name
        weights[name] = w.contiguous()
    save_file(weights, str(merged / "model.safetensors"), metadata={"format": "pt"})
    prompts = root / "p.txt"
    prompts.write_text("1+2=\nhello\n7*6=\n")
    return {"base": base, "ckpt": ckpt, "merged": merged, "prompts": prompts}


def _tokens(capsys, *argv: str) -> list[list[int]]:
    # float32 on every CPU: an adapter and its merge into the base agree to float32 rounding,
    # which keeps greedy tokens equal; in bf16 (the default on a CPU with native bf16) the
    # merged weights round differently and a tiny random model's near-ties flip
    rc = main(["--temperature", "0", "--max-new-tokens", "8", "--jsonl", "--ignore-eos", "--max-model-len", "64",
               "--no-chat-template", "--dtype", "float32", *argv])
    out = capsys.readouterr().out
    assert rc == 0
    return [json.loads(line)["tokens"] for line in out.splitlines()]


def test_adapter_equals_its_merge_and_changes_the_base(dirs, capsys) -> None:
    p = str(dirs["prompts"])
    with_adapter = _tokens(capsys, "--prompts", p, "--model", str(dirs["base"]),
                           "--adapter", str(dirs["ckpt"] / "adapter"))
    from_ckpt_dir = _tokens(capsys, "--prompts", p, "--model", str(dirs["base"]),
                            "--adapter", str(dirs["ckpt"]))
    merged = _tokens(capsys, "--prompts", p, "--model", str(dirs["merged"]))
    base = _tokens(capsys, "--prompts", p, "--model", str(dirs["base"]))
    assert with_adapter == from_ckpt_dir == merged
    assert with_adapter != base


def test_bad_adapter_is_one_line_exit_2(dirs, tmp_path: Path, capsys) -> None:
    p = str(dirs["prompts"])
    rc = main(["--max-model-len", "64", "--prompts", p, "--model", str(dirs["base"]), "--adapter", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no such directory" in err
    bad = tmp_path / "bad"
    shutil.copytree(dirs["ckpt"] / "adapter", bad)
    conf = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "peft_type": "IA3"}))
    rc = main(["--max-model-len", "64", "--prompts", p, "--model", str(dirs["base"]), "--adapter", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "peft_type 'IA3' is not served" in err and "Traceback" not in err
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "r": 8}))
    rc = main(["--max-model-len", "64", "--prompts", p, "--model", str(dirs["base"]), "--adapter", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit the model" in err and "shape of" in err

"""Larger model shapes for the benchmark, with random weights: the configured base's tokenizer and
config with the width and depth of a bigger sibling. Built once and kept under
~/.cache/lmtune/shapes (a 1.7B shape is 3.4 GB in bf16), since nothing about them is learned."""

import hashlib
import json
import shutil
from pathlib import Path

# the shapes users fine-tune on a CPU; the numbers are those of the models' published configs
SHAPES = {
    "smollm2_1.7b": {  # HuggingFaceTB/SmolLM2-1.7B-Instruct
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
    },
}
CACHE = Path.home() / ".cache" / "lmtune" / "shapes"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def shaped_base(name: str, base: str | Path) -> Path:
    """A folder holding a random model of shape `name` around `base`'s tokenizer and config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = Path(base)
    config = json.loads((base / "config.json").read_text()) | SHAPES[name]
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"{name}-{key}"
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(base, **SHAPES[name]), dtype=torch.bfloat16
    )
    model.save_pretrained(partial)
    for file in TOKENIZER_FILES:
        if (base / file).is_file():
            shutil.copyfile(base / file, partial / file)
    parameters = sum(p.numel() for p in model.parameters())
    (partial / "source.json").write_text(json.dumps({"shape": name, "parameters": parameters}) + "\n")
    partial.rename(folder)
    return folder

"""Long checks on the real default model (make test-slow): SmolLM2-135M from the shipped GGUF."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmtune.base.build import build_base
from lmtune.checkpoint import load_tokenizer
from lmtune.config import Config
from lmtune.data.sequences import split, tokenize
from lmtune.data.sources import load_rows
from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora, lora_state
from lmtune.pipeline.params import compose_conf
from lmtune.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), compose_conf([], conf_dir=ROOT / "conf"))
    out = tmp_path_factory.mktemp("base")
    build_base(cfg, out)
    return cfg, out


def test_the_gguf_becomes_a_plain_checkpoint_with_the_right_tokens(smollm2):
    cfg, base = smollm2
    tokenizer = load_tokenizer(base)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer("HAMLET:")["input_ids"][0] != tokenizer.bos_token_id  # no BOS added
    assert (base / "model.safetensors").stat().st_size > 100 * 2**20


def test_nf4_training_on_the_real_model_keeps_every_layer_learning_through_validations(smollm2, tmp_path):
    """The bitsandbytes repack bug zeroes early layers' LoRA gradients of real models after an
    eval-mode forward: train() checks every lora_B gradient at every step."""
    cfg, base = smollm2
    cfg = OmegaConf.merge(
        cfg, {"train": {"max_steps": 3, "eval_every": 1, "eval_batches": 1, "batch_size": 2}}
    )
    tokenizer = load_tokenizer(base)
    rows = split(load_rows(cfg.data)[0], cfg.seed, 0.05, 0.05, 400)
    seqs = tokenize([r["text"] for r in rows["train"]], tokenizer, 128)
    model = add_lora(load_for_training(base, cfg.quant, False), cfg.lora, cfg.seed)
    before = lora_state(model)
    result = train(model, seqs, seqs[:4], cfg, tmp_path, tokenizer.pad_token_id)
    after = lora_state(model)
    assert result["lora_matrices_unchanged"] == 0 and len(result["val_curve"]) == 3
    assert all((after[n] != before[n]).any() for n in before)


def test_without_the_guard_the_real_model_loses_gradients_and_training_stops(smollm2, tmp_path, monkeypatch):
    """Measured here: with bitsandbytes' CPU repack left on, 150 of 210 lora_B matrices get no
    gradient after the first no-grad forward (the head check before training, as a validation
    would); train() stops at the first step and names them."""
    from lmtune.model import load
    from lmtune.train import TrainingError

    monkeypatch.setattr(load, "keep_4bit_trainable", lambda model: 0)
    with pytest.raises(TrainingError, match=r"step 1: 150 LoRA matrices got no gradient .*layers\.0\."):
        test_nf4_training_on_the_real_model_keeps_every_layer_learning_through_validations(smollm2, tmp_path)

"""Training on a tiny Llama: learning through validations, frozen base, exact resume, NaN guard."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from lmtune import modeling
from lmtune.config import Config
from lmtune.metrics import language_model_scores
from lmtune.modeling import add_lora, load_for_training, lora_state
from lmtune.training import TrainingError, train


def make_cfg(smoke_cfg, **sections):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), smoke_cfg)
    return OmegaConf.merge(cfg, sections)


def lora_model(base, cfg):
    return add_lora(load_for_training(base, cfg.quant, cfg.train.gradient_checkpointing), cfg.lora, cfg.seed)


def crash_at(step_to_die):
    def on_step(step, record):
        if step == step_to_die:
            raise KeyboardInterrupt

    return on_step


def frozen_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_every_lora_matrix_learns_although_validation_runs_between_steps(
    tiny_base, tiny_seqs, tmp_path, smoke_cfg, bits
):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(
        smoke_cfg, quant={"bits": bits}, train={"max_steps": 4, "eval_every": 1, "checkpoint_every": 100}
    )
    model = lora_model(tiny_base, cfg)
    before_lora, before_base = lora_state(model), frozen_state(model)
    result = train(model, seqs, seqs[:8], cfg, tmp_path / "ckpt", tokenizer.pad_token_id)
    after_lora, after_base = lora_state(model), frozen_state(model)
    assert len(after_lora) == 2 * 7 * cfg.model.tiny.num_hidden_layers  # A and B on all 7 linears
    changed = [n for n in after_lora if not torch.equal(after_lora[n], before_lora[n])]
    assert len(changed) == len(after_lora)
    assert all(torch.equal(after_base[n], before_base[n]) for n in before_base)
    assert len(result["val_curve"]) == 4 and result["lora_matrices_unchanged"] == 0
    assert all(math.isfinite(p["loss"]) for p in result["train_curve"])


def _train_with_and_without_validations(base, seqs, tokenizer, tmp_path, smoke_cfg):
    finals = []
    for eval_every in (1, 100):
        cfg = make_cfg(smoke_cfg, quant={"bits": 4, "bnb_4bit_compute_dtype": "bf16"},
                       train={"max_steps": 3, "eval_every": eval_every, "checkpoint_every": 100})  # fmt: skip
        model = lora_model(base, cfg)
        train(model, seqs, seqs[:8], cfg, tmp_path / str(eval_every), tokenizer.pad_token_id)
        finals.append(lora_state(model))
    return finals


def test_validations_between_steps_never_change_what_4bit_training_learns(
    tiny_base, tiny_seqs, tmp_path, smoke_cfg
):
    seqs, tokenizer = tiny_seqs
    with_val, without_val = _train_with_and_without_validations(
        tiny_base, seqs, tokenizer, tmp_path, smoke_cfg
    )
    assert all(torch.equal(with_val[n], without_val[n]) for n in with_val)


@pytest.mark.skipif(not modeling.cpu_has_bf16(), reason="the bitsandbytes repack hazard needs AVX512-BF16")
def test_the_validation_check_fails_without_the_repack_guard(
    tiny_base, tiny_seqs, tmp_path, smoke_cfg, monkeypatch
):
    """The checks can fail: with bitsandbytes' CPU repack left on (bitsandbytes 0.49/0.50), the
    first validation cuts the gradient of early adapters, and train() stops, naming them."""
    seqs, tokenizer = tiny_seqs
    monkeypatch.setattr(modeling, "keep_4bit_trainable", lambda model: 0)
    with pytest.raises(TrainingError, match=r"step 2: \d+ LoRA matrices got no gradient .*layers\.0\."):
        _train_with_and_without_validations(tiny_base, seqs, tokenizer, tmp_path, smoke_cfg)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(
        smoke_cfg,
        quant={"bits": 16, "bnb_4bit_compute_dtype": "fp32"},
        lora={"lora_dropout": 0.1},  # dropout draws random numbers: RNG state must be restored too
        train={"max_steps": 5, "eval_every": 2, "checkpoint_every": 2},
    )
    straight = lora_model(tiny_base, cfg)
    train(straight, seqs, seqs[:8], cfg, tmp_path / "a", tokenizer.pad_token_id)

    with pytest.raises(KeyboardInterrupt):  # killed after the step-2 checkpoint
        train(lora_model(tiny_base, cfg), seqs, seqs[:8], cfg, tmp_path / "b", tokenizer.pad_token_id,
              on_step=crash_at(3))  # fmt: skip
    resumed = lora_model(tiny_base, cfg)
    result = train(resumed, seqs, seqs[:8], cfg, tmp_path / "b", tokenizer.pad_token_id)
    assert result["resumed_from_step"] == 2
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_checkpoint_from_other_settings_is_not_resumed(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 16}, train={"max_steps": 3, "checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(tiny_base, cfg), seqs, seqs[:8], cfg, tmp_path, tokenizer.pad_token_id,
              on_step=crash_at(3))  # fmt: skip
    other = OmegaConf.merge(cfg, {"lora": {"r": 4}})
    result = train(lora_model(tiny_base, other), seqs, seqs[:8], other, tmp_path, tokenizer.pad_token_id)
    assert result["resumed_from_step"] is None


def test_nan_loss_stops_with_the_step_named(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 16, "bnb_4bit_compute_dtype": "fp32"})
    model = lora_model(tiny_base, cfg)
    with torch.no_grad():
        model.get_base_model().model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="at step 1"):
        train(model, seqs, seqs[:8], cfg, tmp_path, tokenizer.pad_token_id)


def test_perplexity_matches_a_direct_transformers_computation(tiny_base, tiny_seqs):
    seqs, tokenizer = tiny_seqs
    model = modeling.load_full(tiny_base, torch.float32)
    scores = language_model_scores(model, seqs, batch_size=5, pad_id=tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            total += float(model(input_ids=ids, labels=ids).loss) * (len(seq) - 1)
            count += len(seq) - 1
    assert scores["tokens_scored"] == count
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

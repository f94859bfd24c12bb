"""Training on a tiny Llama: learning through validations, frozen base, exact resume, NaN guard."""

import math
from contextlib import nullcontext

import pytest
import torch
from helpers import language_model_scores
from omegaconf import OmegaConf

from lmtune.base.build import build_base
from lmtune.config import Config
from lmtune.model import load
from lmtune.model.hardware import cpu_has_bf16
from lmtune.model.load import load_for_training, load_full, set_recompute
from lmtune.model.lora import add_lora, lora_state
from lmtune.train import TrainingError, recompute
from lmtune.train.engine import WARMUP_STEPS
from lmtune.train.loop import train
from lmtune.train.recompute import choose_recompute
from lmtune.train.step import micro_batch_loss, prepare_model


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


def train_killed_and_resumed(base, seqs, tokenizer, cfg, folder):
    """(model trained straight through, its result, model killed at step 3 then resumed from its
    step-2 checkpoint, the resumed run's result); checkpoints in folder/a and folder/b."""
    straight = lora_model(base, cfg)
    first = train(straight, seqs, seqs[:8], cfg, folder / "a", tokenizer.pad_token_id)
    with pytest.raises(KeyboardInterrupt):  # killed after the step-2 checkpoint
        train(
            lora_model(base, cfg),
            seqs,
            seqs[:8],
            cfg,
            folder / "b",
            tokenizer.pad_token_id,
            on_step=crash_at(3),
        )
    resumed = lora_model(base, cfg)
    return straight, first, resumed, train(resumed, seqs, seqs[:8], cfg, folder / "b", tokenizer.pad_token_id)


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
        cfg = make_cfg(
            smoke_cfg,
            quant={"bits": 4, "bnb_4bit_compute_dtype": "bf16"},
            train={"max_steps": 3, "eval_every": eval_every, "checkpoint_every": 100},
        )
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


@pytest.mark.skipif(not cpu_has_bf16(), reason="the bitsandbytes repack hazard needs AVX512-BF16")
def test_the_validation_check_fails_without_the_repack_guard(
    tiny_base, tiny_seqs, tmp_path, smoke_cfg, monkeypatch
):
    """The checks can fail: with bitsandbytes' CPU repack left on (bitsandbytes 0.49/0.50), the
    first no-grad forward (the head check before training, as a validation would) cuts the gradient
    of early adapters, and train() stops at the first step, naming them."""
    seqs, tokenizer = tiny_seqs
    monkeypatch.setattr(load, "keep_4bit_trainable", lambda model: 0)
    with pytest.raises(TrainingError, match=r"step 1: \d+ LoRA matrices got no gradient .*layers\.0\."):
        _train_with_and_without_validations(tiny_base, seqs, tokenizer, tmp_path, smoke_cfg)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(
        smoke_cfg,
        quant={"bits": 16, "bnb_4bit_compute_dtype": "fp32"},
        lora={"lora_dropout": 0.1},  # dropout draws random numbers: RNG state must be restored too
        train={"max_steps": 5, "eval_every": 2, "checkpoint_every": 2},
    )
    straight, _, resumed, result = train_killed_and_resumed(tiny_base, seqs, tokenizer, cfg, tmp_path)
    assert result["resumed_from_step"] == 2
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_checkpoint_from_other_settings_is_not_resumed(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 16}, train={"max_steps": 3, "checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        train(
            lora_model(tiny_base, cfg),
            seqs,
            seqs[:8],
            cfg,
            tmp_path,
            tokenizer.pad_token_id,
            on_step=crash_at(3),
        )
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
    model = load_full(tiny_base, torch.float32)
    scores = language_model_scores(model, seqs, batch_size=5, pad_id=tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            total += float(model(input_ids=ids, labels=ids).loss) * (len(seq) - 1)
            count += len(seq) - 1
    assert scores["tokens_scored"] == count
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def _loss_and_lora_grads(model, seqs, cfg, pad_id):
    from lmtune.data.batching import collate_rows

    batch = collate_rows([seqs[:6]], pad_id)
    prepare_model(model, cfg.train)
    model.train()
    loss = micro_batch_loss(model, batch, cfg.train)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def four_layer_base(tmp_path_factory, smoke_cfg):
    """The tiny Llama with 4 decoder layers, same tokenizer: room for every-n-th-layer recompute."""
    from conftest import TEXTS

    out = tmp_path_factory.mktemp("base4")
    build_base(make_cfg(smoke_cfg, model={"tiny": {"num_hidden_layers": 4}}), out, TEXTS)
    return out


def test_recomputing_every_second_layer_changes_no_gradient(four_layer_base, tiny_seqs, smoke_cfg):
    """transformers' every_n_layers: half the decoder layers recompute, the result is the same."""
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 16, "bnb_4bit_compute_dtype": "fp32"})
    results = {}
    for every_n in (None, 2):
        base = load_for_training(four_layer_base, cfg.quant, every_n is not None, every_n_layers=every_n or 1)
        flags = [layer.gradient_checkpointing for layer in base.model.layers]
        model = add_lora(base, cfg.lora, cfg.seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters do something
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        results[every_n] = flags, *_loss_and_lora_grads(model, seqs, cfg, tokenizer.pad_token_id)
    assert results[None][0] == [False] * 4
    assert results[2][0] == [True, False, True, False]
    torch.testing.assert_close(results[2][1], results[None][1])
    for name, grad in results[None][2].items():
        torch.testing.assert_close(results[2][2][name], grad, msg=name)


@pytest.mark.parametrize(
    "budget, chosen",
    [(100.0, "none"), (8.5, "every 2 layers"), (6.5, "every layer"), (1.0, "every layer offloaded")],
)
def test_auto_recompute_takes_the_least_recompute_whose_measured_peak_fits(
    four_layer_base, tiny_seqs, smoke_cfg, budget, chosen, monkeypatch
):
    """The search on the CPU with a stand-in allocator: each candidate's peak is 'measured' as 10
    GiB less 1 GiB per layer that recomputes (4 layers: every 8 and every 4 layers are left out as
    no different from every 2), less 4 GiB when offloaded. The probe leaves no gradient behind and
    no RNG drawn. Under budget nothing fits: the least memory, said so."""
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(
        smoke_cfg,
        quant={"bits": 16, "bnb_4bit_compute_dtype": "fp32"},
        lora={"lora_dropout": 0.1},
        train={"gradient_checkpointing": "auto"},
    )
    model = add_lora(load_for_training(four_layer_base, cfg.quant, "auto"), cfg.lora, cfg.seed)
    layers = model.get_base_model().model.layers
    offloads, forwards = [], []

    def counted_set_recompute(base, n, offload=False):
        offloads.append(offload)
        forwards.clear()
        set_recompute(base, n)  # offloading pins host memory, which needs an accelerator

    monkeypatch.setattr(recompute, "set_recompute", counted_set_recompute)
    mlp_forward = type(layers[0].mlp).forward  # runs again when its layer is recomputed (hooks do not)

    def counted_mlp_forward(module, *args, **kwargs):
        forwards.append(module)
        return mlp_forward(module, *args, **kwargs)

    monkeypatch.setattr(type(layers[0].mlp), "forward", counted_mlp_forward)

    def stand_in_peak():
        # a layer that recomputes ran its MLP twice in the probe: counted, not read from a flag
        recomputed = len(forwards) - len(layers)
        return 10.0 - 1.0 * recomputed - 4.0 * offloads[-1]

    prepare_model(model, cfg.train)
    model.eval()  # as loaded: the probe must recompute all the same
    rng = torch.get_rng_state()
    choice = choose_recompute(
        model, seqs[:8], cfg.train, tokenizer.pad_token_id, nullcontext(), budget, stand_in_peak
    )
    assert choice["recompute"] == chosen
    assert choice["fits"] == (budget > 2.0)  # 2 GiB and the AdamW moments
    assert list(choice["measured_peak_gib"])[-1] == chosen  # measured until the first that fits
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # the mode it came in


def test_fp16_trains_through_a_loss_scaler_and_resumes_exactly(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    """Cards without bf16 (T4, V100) compute in fp16: autocast + GradScaler, whose scale is part
    of the checkpoint (a resumed run would otherwise skip or scale differently)."""
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(
        smoke_cfg,
        quant={"bits": 16, "bnb_4bit_compute_dtype": "fp16"},
        train={"max_steps": 4, "eval_every": 2, "checkpoint_every": 2},
    )
    straight, first, resumed, result = train_killed_and_resumed(tiny_base, seqs, tokenizer, cfg, tmp_path)
    assert first["lora_matrices_unchanged"] == 0
    assert all(math.isfinite(p["loss"]) for p in first["train_curve"])
    scaler_state = torch.load(next((tmp_path / "b").glob("step-*")) / "optim.pt", weights_only=True)["scaler"]
    assert scaler_state["scale"] > 0  # the scaler was on and its scale saved
    assert result["resumed_from_step"] == 2
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_result_reports_warm_up_and_steady_rates_apart(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 16}, train={"max_steps": 7, "checkpoint_every": 100})
    result = train(lora_model(tiny_base, cfg), seqs, seqs[:8], cfg, tmp_path, tokenizer.pad_token_id)
    times = result["step_times"]
    assert [t["step"] for t in times] == list(range(1, 8)) and result["warmup_steps"] == WARMUP_STEPS
    steady = times[WARMUP_STEPS:]
    expected = sum(t["tokens"] for t in steady) / sum(t["seconds"] for t in steady)
    assert result["steady_tokens_per_second"] == pytest.approx(expected)
    assert sum(t["tokens"] for t in times) == result["train_tokens"]


def test_epochs_train_the_steps_they_mean_and_say_so(tiny_base, tiny_seqs, tmp_path, smoke_cfg, capsys):
    """train.epochs instead of train.max_steps: two passes over 20 passages, 4 a step, are 10
    steps; the run says so, and records them as what max_steps ran with."""
    from lmtune.config import ConfigError, validate

    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 16}, train={"max_steps": None, "epochs": 2, "batch_size": 4})
    result = train(
        lora_model(tiny_base, cfg), seqs[:20], seqs[:8], cfg, tmp_path / "ckpt", tokenizer.pad_token_id
    )
    assert result["steps"] == 10 and len(result["train_curve"]) == 10
    assert result["ran_with"]["train.max_steps"]["ran"] == 10
    assert result["ran_with"]["train.max_steps"]["asked"] is None
    assert "train.epochs=2 over 20 training passages, 4 a step: 10 steps" in capsys.readouterr().out
    for both_or_neither in ({"epochs": 2}, {"max_steps": None}):
        with pytest.raises(ConfigError, match="set exactly one"):
            validate(OmegaConf.merge(smoke_cfg, {"train": both_or_neither}))

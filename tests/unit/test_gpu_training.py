"""The training path on a CUDA card (pytest -m gpu; skipped without one). These need only torch,
transformers, peft, accelerate, bitsandbytes, omegaconf and hydra: what bench/device_check.sh
installs on a CUDA machine that has only torch. The whole pipeline through DVC is tests/pipeline/test_cuda.py."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from lmtune.config import Config
from lmtune.data.batching import collate_rows
from lmtune.model.hardware import free_device_memory, placement
from lmtune.model.load import load_for_training, load_full
from lmtune.model.lora import add_lora, lora_state
from lmtune.train import kernels
from lmtune.train.loop import train
from lmtune.train.step import micro_batch_loss, prepare_model, to_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def make_cfg(smoke_cfg, **sections):
    return OmegaConf.merge(OmegaConf.structured(Config), smoke_cfg, sections)


def packed(lengths):
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return position_ids, kernels.packed_segments(position_ids)


@pytest.mark.parametrize(
    "kv_heads, window, value_dim", [(8, None, 64), (2, None, 64), (2, 128, 64), (8, None, 32)]
)
def test_flash_varlen_equals_the_per_passage_path_on_the_card(kv_heads, window, value_dim):
    """torch's varlen kernel (one call) against SDPA per passage, bf16, forward and gradients; with
    grouped heads, a sliding window, and value heads smaller than query/key heads (latent attention)."""
    card = torch.zeros(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    if window and not kernels.use_flash_varlen(card, window, None, None):
        pytest.skip("this torch's varlen_attn has no window_size")
    assert kernels.use_flash_varlen(card, None, None, None)
    torch.manual_seed(0)
    _, segments = packed([300, 1, 77, 647])
    q, k = (
        torch.randn(1, heads, 1025, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for heads in (8, kv_heads)
    )
    v = torch.randn(1, kv_heads, 1025, value_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, 1025, 8, value_dim, device="cuda", dtype=torch.bfloat16)

    class Attention:
        is_causal, training = True, True

    outputs = {}
    for flash in (True, False):
        for t in (q, k, v):
            t.grad = None
        use = kernels.use_flash_varlen
        kernels.use_flash_varlen = lambda query, *features, flash=flash: flash
        try:
            out, _ = kernels.varlen_attention(
                Attention(), q, k, v, None, scaling=0.125, sliding_window=window, **segments
            )
        finally:
            kernels.use_flash_varlen = use
        out.backward(grad)
        outputs[flash] = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    for mine, theirs in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(mine, theirs, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "family", ["llama", "mistral", "gemma3_text", "gemma2", "gpt_oss", "deepseek_v3", "cohere"]
)
def test_every_family_trains_exactly_on_the_card(family, dtype):
    """tests/unit/test_families.py on the card. In fp32 (the per-passage SDPA path, windows as a
    mask) lmtune equals transformers' loss on each passage alone. In bf16 (torch's flash varlen
    kernel where it applies; soft-capping and sinks per passage) it is as close to the fp32 answer
    as transformers in bf16 is."""
    from test_families import (
        FAMILIES,
        bf16_against_fp32,
        family_cfg,
        lmtune_step,
        passages,
        reference,
        tiny_model,
        with_lora,
    )

    if dtype == torch.bfloat16:
        loss_error, their_loss_error, error, their_error = bf16_against_fp32(family, "cuda")
        print(f"{family} bf16 vs fp32: gradients lmtune {error:.4f}, transformers {their_error:.4f}")
        assert loss_error <= 2 * their_loss_error + 1e-3
        assert error <= 2 * their_error + 1e-2, (
            f"{family}: gradients off by {error:.3f}, transformers' by {their_error:.3f}"
        )
        return
    cfg = family_cfg("varlen")
    model = with_lora(tiny_model(family).to("cuda"), cfg)
    expected_loss, expected = reference(model, passages())
    loss, got, fallen, _ = lmtune_step(model, cfg)
    assert fallen == (("packing",) if "varlen" in FAMILIES[family][2] else ())
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    for name, grad in got.items():
        error = (grad - expected[name]).norm() / expected[name].norm().clamp(min=1e-12)
        assert error < 1e-3, f"{family}: {name} off by {float(error):.1e}"


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_preference_losses_on_packed_rows_on_the_card(tiny_base, method):
    """tests/unit/test_align.py on the card: in fp32 the packed pairs give the loss and gradients of
    the pairs scored one by one; in bf16, through the flash varlen kernel, they are as close to
    that fp32 answer as the pairs scored one by one in bf16 are."""
    from test_align import gradient_error, loss_and_gradients

    exact_loss, _, exact = loss_and_gradients(tiny_base, method, packed=False, device="cuda")
    packed_loss, _, packed = loss_and_gradients(tiny_base, method, packed=True, device="cuda")
    torch.testing.assert_close(packed_loss, exact_loss, rtol=1e-4, atol=1e-6)
    assert gradient_error(packed, exact) < 1e-4
    bf16_loss, _, bf16 = loss_and_gradients(tiny_base, method, True, "cuda", torch.bfloat16)
    alone_loss, _, alone = loss_and_gradients(tiny_base, method, False, "cuda", torch.bfloat16)
    error, their_error = gradient_error(bf16, exact), gradient_error(alone, exact)
    print(f"{method} bf16 vs fp32: packed {error:.4f}, one by one {their_error:.4f}")
    assert abs(bf16_loss - exact_loss) <= 2 * abs(alone_loss - exact_loss) + 1e-2 * abs(exact_loss)
    assert error <= 2 * their_error + 1e-2


def test_the_attention_never_waits_for_the_card():
    """No host synchronisation inside the varlen attention (the old per-passage path read the
    boundaries back from the card in every layer): torch raises on any sync in this block."""
    _, segments = packed([100, 400, 24])
    segments = to_device(segments)  # as the training loop hands them down: on the card, before the step
    q = torch.randn(1, 8, 524, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, 8, 524, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    torch.cuda.synchronize()

    class Attention:
        is_causal, training = True, True

    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = kernels.varlen_attention(Attention(), q, k, v, None, scaling=0.125, **segments)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_packed_4bit_micro_batch_gives_the_sdpa_loss_on_the_card(tiny_base, tiny_seqs, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 4, "bnb_4bit_compute_dtype": "bf16"})
    batch = {k: v.cuda() for k, v in collate_rows([seqs[:8]], tokenizer.pad_token_id).items()}
    losses = {}
    for attention in ("varlen", "sdpa"):
        tc = OmegaConf.merge(cfg.train, {"attention": attention})
        model = add_lora(load_for_training(tiny_base, cfg.quant, False), cfg.lora, cfg.seed)
        prepare_model(model, tc)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[attention] = float(micro_batch_loss(model, batch, tc))
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-2)


def test_auto_recompute_measures_peaks_on_the_card_and_trains(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(
        smoke_cfg,
        quant={"bits": 4, "bnb_4bit_compute_dtype": "bf16"},
        train={"max_steps": 4, "gradient_checkpointing": "auto", "memory_budget_gib": 1e-4},
    )
    model = add_lora(load_for_training(tiny_base, cfg.quant, "auto"), cfg.lora, cfg.seed)
    before = lora_state(model)
    result = train(model, seqs, seqs[:8], cfg, tmp_path, tokenizer.pad_token_id)
    peaks = result["measured_peak_gib"]
    # a budget nothing meets: every candidate measured, from none to offloaded, the last taken
    assert list(peaks)[0] == "none" and result["recompute"] == "every layer offloaded" and not result["fits"]
    assert all(0 < v < 1 for v in peaks.values())
    after = lora_state(model)
    assert all(not torch.equal(after[n], before[n]) for n in after)


def test_fp16_cards_train_with_a_loss_scaler(tiny_base, tiny_seqs, tmp_path, smoke_cfg):
    seqs, tokenizer = tiny_seqs
    cfg = make_cfg(smoke_cfg, quant={"bits": 4, "bnb_4bit_compute_dtype": "fp16"}, train={"max_steps": 4})
    model = add_lora(load_for_training(tiny_base, cfg.quant, False), cfg.lora, cfg.seed)
    result = train(model, seqs, seqs[:8], cfg, tmp_path, tokenizer.pad_token_id)
    assert result["lora_matrices_unchanged"] == 0 and all(
        math.isfinite(p["loss"]) for p in result["train_curve"]
    )


def test_models_leave_nothing_on_the_card_once_released(tiny_base):
    before = free_device_memory()
    model = load_full(tiny_base, torch.float32)
    assert next(model.parameters()).is_cuda
    del model
    assert free_device_memory() == pytest.approx(before, abs=1e-3)
    assert placement(tiny_base, torch.float32, "auto").type == "cuda"  # tiny: fits


def run_stages(names, cfg):
    """Each stage's `run(cfg)` in this process, in order, as DVC would call them (without DVC and
    MLflow, which such a machine may lack); returns what each returned."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    results = {}
    for name in names:
        spec = importlib.util.spec_from_file_location(f"stage_{name}", root / "stages" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results[name] = module.run(cfg)
    return results


@pytest.fixture(scope="module")
def smoke_on_the_card(tmp_path_factory, smoke_cfg):
    """The smoke profile's stages up to sample, run in a scratch folder with no change of config."""
    import os

    folder = tmp_path_factory.mktemp("smoke")
    cfg = make_cfg(smoke_cfg)
    here = os.getcwd()
    os.chdir(folder)  # the stages' paths are relative, as under `dvc repro`
    try:
        run_stages(["base", "prepare", "finetune", "merge", "quantize", "sample"], cfg)
        yield folder, cfg
    finally:
        os.chdir(here)


def test_the_smoke_profile_trains_merges_quantizes_and_samples_on_the_card(smoke_on_the_card):
    import json

    folder, _ = smoke_on_the_card
    train_metrics = json.loads((folder / "metrics/train.json").read_text())
    assert 0 < train_metrics["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    assert train_metrics["lora_matrices_unchanged"] == 0
    merge = json.loads((folder / "metrics/merge.json").read_text())
    assert merge["device"] == "cuda" and merge["max_logit_diff"] < 1e-3
    assert (folder / "models/quantized").is_dir() and (folder / "metrics/samples.md").is_file()


def test_evaluate_runs_on_the_card_and_frees_it_between_models(smoke_on_the_card):
    pytest.importorskip("evaluate")
    pytest.importorskip("lm_eval")  # the eval stage's benchmarks; not among bench/device_check.sh's wheels
    import json
    import os

    folder, cfg = smoke_on_the_card
    here = os.getcwd()
    os.chdir(folder)
    try:
        run_stages(["eval"], cfg)
    finally:
        os.chdir(here)
    scores = json.loads((folder / "metrics/eval.json").read_text())
    assert scores["settings"]["device"].startswith("cuda")
    assert scores["models"]["merged"]["perplexity"]["value"] < scores["models"]["base"]["perplexity"]["value"]
    assert all(speed["gpu_gib_left_after_release"] < 0.05 for speed in scores["speed"].values())

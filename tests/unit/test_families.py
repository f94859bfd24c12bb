"""Every model family lmtune trains, on tiny random models built in-process: the training step
(packed rows, varlen or sdpa attention, the chunked loss, or the exact fallback the step picks for
the family) gives transformers' loss on each passage alone, and the same LoRA gradients, in fp32.

The families cover what the packed kernels must implement (a sliding window shorter than a
passage, soft-capped attention and output logits, sinks, latent attention with unequal head sizes,
a scaled head); each lists the attention paths under which it must fall back to padded batches
(linear attention everywhere, soft-capping and sinks under sdpa). Every other case keeps packing
and the chunked loss."""

import pytest
import torch
import transformers
from conftest import ROOT
from omegaconf import OmegaConf

from lmtune.model.lora import add_lora
from lmtune.pipeline.params import compose_conf
from lmtune.train.exact_path import choose_exact_path
from lmtune.train.kernels import packed_segments
from lmtune.train.step import collate_micro_batch, micro_batch_loss, prepare_model

VOCAB, WINDOW = 96, 8  # passages up to 40 tokens: the window matters
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# one linear-attention layer, then one full-attention layer (Qwen3-Next, Qwen3.5)
HYBRID_LINEAR = {
    "head_dim": 16,
    "layer_types": ["linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
# family → (config class, its own settings, the attention paths under which it must train unpacked)
FAMILIES = {
    "llama": ("LlamaConfig", {}, ()),
    "qwen2": ("Qwen2Config", {}, ()),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, ()),
    "phi3": ("Phi3Config", {}, ()),
    "gemma": ("GemmaConfig", {"head_dim": 16}, ()),
    "olmo2": ("Olmo2Config", {}, ()),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, ()),
    "smollm3": ("SmolLM3Config", {}, ()),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        (),
    ),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW}, ()),
    "olmo3": ("Olmo3Config", {"sliding_window": WINDOW}, ()),
    "cohere2": ("Cohere2Config", {"sliding_window": WINDOW, "logit_scale": 0.5}, ()),
    "gpt_oss": (
        "GptOssConfig",
        {"head_dim": 16, "sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
        ("sdpa",),  # sinks
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        HYBRID_LINEAR
        | {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        ("varlen", "sdpa"),
    ),
    "qwen3_5": ("Qwen3_5TextConfig", HYBRID_LINEAR, ("varlen", "sdpa")),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}, ()),
    "starcoder2": ("Starcoder2Config", {"sliding_window": WINDOW}, ()),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 0.1,
            "final_logit_softcapping": 0.5,
        },
        ("sdpa",),  # soft-capped attention
    ),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}, ()),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}, ()),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "num_key_value_heads": 4,  # latent attention has no grouped heads
        },
        (),
    ),
}


def tiny_model(family: str, **overrides):
    name, own, _ = FAMILIES[family]
    config = getattr(transformers, name)(**{**SMALL, **own, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # its default attention


def passages() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [[1, *torch.randint(3, VOCAB, (n - 1,), generator=generator).tolist()] for n in (40, 23, 31, 12)]


def with_lora(model, cfg):
    model = add_lora(model, cfg.lora, cfg.seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            noise = torch.empty(p.shape).normal_(
                0.0, 0.05, generator=torch.Generator().manual_seed(len(name))
            )
            with torch.no_grad():  # drawn on the host, so the same on every device
                p.copy_(noise)
    return model


def reference(model, seqs):
    """transformers' own loss on each passage alone, token-weighted, and its LoRA gradients."""
    model.zero_grad()
    total = sum(len(s) - 1 for s in seqs)
    ids = [torch.tensor([s], device=model.device) for s in seqs]
    loss = sum(model(input_ids=i, labels=i).loss.float() * (i.shape[1] - 1) for i in ids) / total
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def family_cfg(attention: str):
    cfg = compose_conf(
        ["experiment=smoke", f"train.attention={attention}", "train.pack_length=128", "data.max_length=40"],
        conf_dir=ROOT / "conf",
    )
    cfg.lora.r = 4
    return cfg


def lmtune_step(model, cfg):
    """The training step as finetune runs it: the exact path for the family, packed rows, the
    configured attention and loss. (loss, LoRA gradients, what fell back, the notes said)."""
    exact, implementation, notes = choose_exact_path(model, cfg)
    fallen = tuple(k for k in ("packing", "chunked_loss") if exact.train[k] != cfg.train[k])
    if implementation:
        model.get_base_model().set_attn_implementation(implementation)
    model.zero_grad()
    tc = exact.train
    batch = collate_micro_batch(passages(), tc, pad_id=0)
    prepare_model(model, tc)
    segments = packed_segments(batch["position_ids"]) if "position_ids" in batch else None
    batch = {k: v.to(model.device) for k, v in batch.items()}
    loss = micro_batch_loss(model, batch, tc, segments)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads, fallen, notes


@pytest.mark.parametrize("attention", ["varlen", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_step_equals_transformers_on_each_passage_alone(family, attention):
    cfg = family_cfg(attention)
    model = with_lora(tiny_model(family), cfg)
    expected_loss, expected = reference(model, passages())
    loss, got, fallen, notes = lmtune_step(model, cfg)
    assert fallen == (("packing",) if attention in FAMILIES[family][2] else ())
    assert len(notes) == len(fallen)  # one line per fallback
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=f"{family}: {name}")


def bf16_against_fp32(family: str, device: str = "cpu") -> tuple[float, float, float, float]:
    """In bf16 no answer is exact, so lmtune is held to what transformers itself gets in bf16, both
    measured against the fp32 answer (as flash-attention's own tests judge their kernels). Returns
    (lmtune's loss error, transformers', lmtune's relative error over all LoRA gradients as one
    vector, transformers'). Mixture-of-experts families route every token to every expert here: a
    top-k choice is not continuous, and bf16 rounding alone flips a near tie to another expert
    (on a card that put deepseek_v3's gradients 12% off fp32 under any attention path)."""
    own = FAMILIES[family][1]
    every_expert = (
        {
            "num_experts_per_tok": next(
                own[k] for k in ("num_local_experts", "n_routed_experts", "num_experts") if k in own
            )
        }
        if "num_experts_per_tok" in own
        else {}
    )
    cfg = family_cfg("varlen")
    model = with_lora(tiny_model(family, **every_expert).to(device), cfg)
    exact_loss, exact = reference(model, passages())
    model = with_lora(tiny_model(family, **every_expert).to(device, torch.bfloat16), cfg)
    theirs_loss, theirs = reference(model, passages())
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, got, _, _ = lmtune_step(model, cfg)

    def error(grads: dict) -> float:
        flat = torch.cat([grads[name].float().flatten() for name in exact])
        want = torch.cat([g.float().flatten() for g in exact.values()])
        return float((flat - want).norm() / want.norm())

    return abs(loss - exact_loss), abs(theirs_loss - exact_loss), error(got), error(theirs)


@pytest.mark.parametrize("family", ["llama", "gemma2", "deepseek_v3", "gpt_oss"])
def test_in_bf16_the_training_step_is_as_close_to_fp32_as_transformers(family):
    loss_error, their_loss_error, error, their_error = bf16_against_fp32(family)
    assert loss_error <= 2 * their_loss_error + 1e-3
    assert error <= 2 * their_error + 1e-2, (
        f"{family}: gradients off by {error:.3f}, transformers' by {their_error:.3f}"
    )


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "mistral", "deepseek_v3"])
def test_validation_on_padded_batches_through_the_varlen_model_is_transformers_loss(family):
    """Validation batches are padded, not packed: the model set up for packed varlen training must
    score them as transformers does (soft-capping and sinks included, where sdpa has neither)."""
    from lmtune.train.loop import validation_loss

    cfg = compose_conf(["experiment=smoke", "train.attention=varlen"], conf_dir=ROOT / "conf")
    cfg.lora.r = 4
    model = with_lora(tiny_model(family), cfg)
    expected, _ = reference(model, passages())
    prepare_model(model, cfg.train)
    assert model.config._attn_implementation == "lmtune_varlen"
    with torch.no_grad():
        assert validation_loss(model, passages(), batch_size=4, batches=1, pad_id=0) == pytest.approx(
            expected, rel=1e-5
        )


def test_a_fallback_says_why_in_one_line(monkeypatch):
    cfg = compose_conf(["experiment=smoke", "data.max_length=40"], conf_dir=ROOT / "conf")
    cfg.lora.r = 4
    gemma2 = with_lora(tiny_model("gemma2"), cfg)
    assert choose_exact_path(gemma2, OmegaConf.merge(cfg, {"train": {"attention": "varlen"}}))[1:] == (
        None,
        {},
    )
    exact, implementation, notes = choose_exact_path(
        gemma2, OmegaConf.merge(cfg, {"train": {"attention": "sdpa"}})
    )
    assert implementation == "eager" and not exact.train.packing  # sdpa has no soft-capping
    assert notes == {
        "train.packing": "gemma2: soft-capped attention logits (transformers' sdpa has no cap): packed "
        "rows would attend wrongly, so this model trains on padded batches with transformers' own "
        "attention (train.packing=false); train.attention=varlen packs it exactly"
    }
    padded = OmegaConf.merge(cfg, {"train": {"packing": False}})  # the user's own choice
    assert choose_exact_path(gemma2, padded)[1:] == ("eager", {})
    notes = choose_exact_path(with_lora(tiny_model("qwen3_5"), cfg), cfg)[2]
    assert (
        notes["train.packing"].startswith("qwen3_5_text: linear_attention layers: packed rows")
        and "varlen packs" not in notes["train.packing"]
    )

    # a head that does more than the chunked loss knows is caught by comparing logits, not assumed
    import lmtune.train.exact_path as exact_path

    monkeypatch.setattr(exact_path, "head_transform", lambda config: (1.0, None))  # Granite's scaling unknown
    exact, _, notes = choose_exact_path(with_lora(tiny_model("granite"), cfg), cfg)
    assert not exact.train.chunked_loss and exact.train.packing
    (note,) = notes.values()
    assert list(notes) == ["train.chunked_loss"]
    assert note.startswith(
        "granite: the output head computes logits the chunked loss does not (they differ by"
    )
    assert note.endswith("so this model's loss is transformers' own (train.chunked_loss=false)")


def saved(tmp_path, family: str, **own):
    """A tiny model of a family (FAMILIES, or any config class by name) saved as a checkpoint."""
    name, settings, _ = FAMILIES.get(family, (family, {}, ()))
    config = getattr(transformers, name)(**{**SMALL, **settings, **own})
    folder = tmp_path / family
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_4bit_means_4bit_or_it_says_what_is_not_and_why(tmp_path, capsys):
    from lmtune.model.load import left_unquantized, load_for_training

    quant = compose_conf(["quant=nf4", "quant.bnb_4bit_compute_dtype=fp32"], conf_dir=ROOT / "conf").quant
    llama = load_for_training(saved(tmp_path, "llama"), quant, False)
    assert left_unquantized(llama) == (14, [])  # 7 linear layers x 2 decoder layers, all 4-bit
    assert "note:" not in capsys.readouterr().out
    load_for_training(saved(tmp_path, "mixtral"), quant, False)
    said = capsys.readouterr().out
    assert "stay in 16 bits, e.g. layers.0.mlp.experts (experts as 3-D tensors)" in said
    # Falcon's FalconLinear is a torch.nn.Linear subclass bitsandbytes would leave alone: built plain
    falcon = {k: v for k, v in SMALL.items() if k not in ("intermediate_size", "num_key_value_heads")}
    folder = tmp_path / "falcon"
    reference_model = transformers.AutoModelForCausalLM.from_config(transformers.FalconConfig(**falcon))
    reference_model.save_pretrained(folder)
    assert left_unquantized(load_for_training(folder, quant, False)) == (8, [])  # qkv, dense, 2 MLP x 2
    assert "note:" not in capsys.readouterr().out
    from lmtune.model.load import load_full

    full = load_full(folder, torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 60]])
    with torch.no_grad():  # the plain layers compute what Falcon's own do
        torch.testing.assert_close(full(input_ids=ids).logits, reference_model.eval()(input_ids=ids).logits)
    assert type(transformers.models.falcon.modeling_falcon.FalconAttention(full.config).dense).__name__ == (
        "FalconLinear"
    )  # the swap holds only while lmtune loads
    from lmtune.export.quantize import load_quantized, quantize

    quantize(folder, tmp_path / "int8", "int8_weight_only", torch.float32)  # the default post-training form
    with torch.no_grad():
        int8 = load_quantized(tmp_path / "int8", torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(int8, full(input_ids=ids).logits, atol=0.05, rtol=0.05)


def test_a_decoder_bitsandbytes_did_not_quantize_is_an_error_before_training(tmp_path):
    from lmtune.checkpoint import ModelError
    from lmtune.model.load import check_quantized, load_full

    folder = saved(tmp_path, "llama")
    with pytest.raises(
        ModelError, match=r"quant.bits=4: bitsandbytes quantized no layer of .*layers.0.self_attn"
    ):
        check_quantized(load_full(folder, torch.float32), 4, folder)


def test_lora_on_a_multimodal_checkpoint_adapts_its_language_model_only():
    text = {k: v for k, v in SMALL.items() if k != "tie_word_embeddings"} | {"head_dim": 16}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=95,
        boi_token_index=93,
        eoi_token_index=94,
    )
    cfg = compose_conf(["experiment=smoke"], conf_dir=ROOT / "conf")
    cfg.lora.r = 4
    adapted = {
        n
        for n, _ in add_lora(transformers.Gemma3ForConditionalGeneration(config), cfg.lora, 0).named_modules()
        if n.endswith("lora_A")
    }
    assert adapted and all(".language_model." in n for n in adapted)  # no adapter on the vision tower
    assert any("q_proj" in n for n in adapted) and any("down_proj" in n for n in adapted)
    cfg.lora.target_modules = ["q_proj"]  # asked for by name: taken as given, vision tower included
    named = {
        n
        for n, _ in add_lora(transformers.Gemma3ForConditionalGeneration(config), cfg.lora, 0).named_modules()
        if n.endswith("lora_A")
    }
    assert any(".vision_tower." in n for n in named)


def test_a_family_that_falls_back_records_what_it_ran_with_everywhere(tmp_path, monkeypatch):
    """qwen3_5 cannot pack (linear-attention layers): the adapter's config.yaml, train.json's
    `ran_with` and the MLflow run say packing was off, and what was asked, and why."""
    from lmtune.artifacts import save_config
    from lmtune.track import runs as tracking
    from lmtune.track import store
    from lmtune.train.loop import train

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.merge(
        family_cfg("sdpa"),
        {
            "train": {
                "max_steps": 2,
                "warmup_steps": 1,
                "eval_every": 2,
                "checkpoint_every": 2,
                "batch_size": 2,
            }
        },
        {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
    )
    assert cfg.train.packing
    model = with_lora(tiny_model("qwen3_5"), cfg)  # B not zero: every LoRA matrix moves at once
    with tracking.stage_run(cfg, "finetune") as run:
        result = train(model, passages() * 4, passages(), cfg, tmp_path / "ckpt", pad_id=0)
        ran_with = result["ran_with"]
        tracking.record_ran_with(ran_with)
    (entry,) = ran_with.values()
    assert list(ran_with) == ["train.packing"] and (entry["asked"], entry["ran"]) == (True, False)
    assert entry["why"].startswith("qwen3_5_text: linear_attention layers")
    save_config(cfg, tmp_path, ("train",), ran_with)
    line = next(x for x in (tmp_path / "config.yaml").read_text().splitlines() if "packing:" in x)
    assert line.startswith("  packing: false  # asked: true; qwen3_5_text: linear_attention layers")
    assert OmegaConf.load(tmp_path / "config.yaml").train.packing is False  # the comment is only a comment
    tag = store.client(cfg.tracking.uri).get_run(run.run_id).data.tags["ran.train.packing"]
    assert tag.startswith("false (asked: true; qwen3_5_text: linear_attention layers")


# each model config's recipe (conf/experiment/<model>_qlora.yaml) → the family of its architecture
RECIPES = {
    "llama2_7b": "llama",
    "llama3_8b": "llama",
    "mistral_7b": "mistral",
    "qwen3_8b": "qwen3",
    "gemma3_1b": "gemma3_text",
    "phi4_mini": "phi3",
}


def test_every_model_config_has_a_recipe():
    demo = {"smollm2_135m", "tiny_random"}  # the CPU default and the tests' model
    assert {p.stem for p in (ROOT / "conf/model").glob("*.yaml")} - demo == set(RECIPES)
    assert {p.stem for p in (ROOT / "conf/experiment").glob("*_qlora.yaml")} == {
        f"{m}_qlora" for m in RECIPES
    }


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_composes_offline_and_trains_two_steps_on_its_architecture_shrunk(recipe, tmp_path):
    """The recipe as the user launches it, on the model's own config class at a tiny width and
    depth (random weights): a typo or a combination lmtune cannot train fails here, not on a card."""
    from lmtune.model.load import load_for_training
    from lmtune.train.loop import train

    cfg = compose_conf([f"experiment={recipe}_qlora"], conf_dir=ROOT / "conf")
    assert (cfg.model.name, cfg.quant.bits, cfg.lora.r, cfg.train.epochs) == (recipe, 4, 64, 1)
    short = {"max_steps": 2, "epochs": None, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2}
    cfg = OmegaConf.merge(cfg, {"train": short, "data": {"max_length": 40}})
    folder = saved(tmp_path, RECIPES[recipe], hidden_size=128)  # 4-bit blocks need a width of 64s
    base = load_for_training(folder, cfg.quant, cfg.train.gradient_checkpointing)
    model = with_lora(base, cfg)
    result = train(model, passages() * 2, passages(), cfg, tmp_path / "ckpt", pad_id=0)
    assert result["steps"] == 2 and result["lora_matrices_unchanged"] == 0
    assert all(torch.isfinite(torch.tensor(p["loss"])) for p in result["train_curve"])

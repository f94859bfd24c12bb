"""Preference tuning: the pairs users bring read or refused by name, and each loss computed on
packed rows equal to the same pairs scored one by one and to trl's implementation."""

from types import SimpleNamespace

import pytest
import torch

from lmtune.align import AlignError
from lmtune.align.logps import sequence_logps
from lmtune.align.losses import METHODS, preference_loss, slots
from lmtune.align.pairs import pair_sequences, read_pair, read_pairs, response_sequence
from lmtune.checkpoint import load_tokenizer
from lmtune.data.sequences import Sequence

PROMPT = [{"role": "user", "content": "Who are you?"}]
CHOSEN = [{"role": "assistant", "content": "I am a bot."}]
REJECTED = [{"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "Who are you?", "chosen": "I am a bot.", "rejected": "Blue."},
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
        {"instruction": "Who are you?", "chosen": "I am a bot.", "rejected": "Blue."},
        {
            "conversations": [{"from": "human", "value": "Who are you?"}],
            "chosen": {"from": "gpt", "value": "I am a bot."},
            "rejected": {"from": "gpt", "value": "Blue."},
        },
    ],
    ids=["text", "conversational", "whole-conversations", "alpaca", "sharegpt"],
)
def test_every_preference_format_reads_as_the_same_pair(record):
    assert read_pair(record) == {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "no 'rejected' field"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": " "}, "'rejected' is empty"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "are the same"),
        (
            {"chosen": PROMPT + CHOSEN, "rejected": [{"role": "user", "content": "Other?"}, *REJECTED]},
            "differ before their last turn",
        ),
        (
            {"prompt": "Hi", "chosen": [{"role": "robot", "content": "x"}], "rejected": "y"},
            "'chosen' must be",
        ),
    ],
)
def test_a_bad_row_is_refused_with_what_is_wrong(record, says):
    with pytest.raises(ValueError, match=says):
        read_pair(record)


def test_bad_rows_are_named_by_file_and_line_and_unpaired_rows_refused_for_a_paired_loss():
    records = [
        ({"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}, "prefs.jsonl:1"),
        ({"prompt": "Hi", "chosen": "Hello"}, "prefs.jsonl:2"),
        ({"prompt": "Hi", "completion": "Hello", "label": True}, "prefs.jsonl:3"),
        (ValueError("not valid JSON"), "prefs.jsonl:4"),
    ]
    with pytest.raises(AlignError) as refused:
        read_pairs(records)
    message = str(refused.value)
    assert "prefs.jsonl:1" not in message
    assert "prefs.jsonl:2: no 'rejected'" in message and "prefs.jsonl:4: not valid JSON" in message
    assert "prefs.jsonl:3: an unpaired row" in message
    assert read_pairs(records[2:3], paired=False)[0]["label"] is True


def test_only_the_response_is_learned_and_a_long_pair_names_the_length_to_set(tiny_base):
    tokenizer = load_tokenizer(tiny_base)
    seq = response_sequence(PROMPT, CHOSEN, tokenizer)
    prompt_text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    prompt_only = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert list(seq[: len(prompt_only)]) == list(prompt_only)
    assert not any(seq.mask[: len(prompt_only)]) and all(seq.mask[len(prompt_only) : len(prompt_only) + 3])
    pair = {**read_pair({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}), "where": "p.jsonl:7"}
    with pytest.raises(AlignError, match=rf"p.jsonl:7 \({len(seq)}\).*raise data.max_length to {len(seq)}"):
        pair_sequences([pair], tokenizer, max_length=len(seq) - 1)
    assert pair_sequences([pair], tokenizer, max_length=len(seq) - 1, drop_long=True) == ([], [])


def random_pairs(count: int, vocab: int, seed: int = 0) -> list[tuple[Sequence, Sequence]]:
    """Pairs sharing a prompt per pair, responses of different lengths, only responses learned."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        responses = []
        for _ in range(2):
            answer = torch.randint(
                3, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g
            ).tolist()
            responses.append(Sequence(prompt + answer, [0] * len(prompt) + [1] * len(answer)))
        pairs.append(tuple(responses))
    return pairs


def lora_model(tiny_base, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    # random A and B: a LoRA that already moves the logits, so the policy differs from the reference
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def scored(model, pairs, pad_id, packed: bool, names=("chosen", "rejected")) -> dict:
    """Per-pair summed log-probs and lengths: all responses in one packed row, or each alone."""
    first, second = names
    seqs = [s for pair in pairs for s in pair]
    if packed:
        sums, counts = sequence_logps(model, seqs, pad_id, packed=True)
    else:
        each = [sequence_logps(model, [s], pad_id, packed=False) for s in seqs]
        sums, counts = torch.cat([s for s, _ in each]), torch.cat([c for _, c in each])
    return {
        first: sums[0::2],
        second: sums[1::2],
        f"{first}_tokens": counts[0::2],
        f"{second}_tokens": counts[1::2],
    }


def loss_and_gradients(tiny_base, method: str, packed: bool, device="cpu", dtype=torch.float32):
    """One preference step on five random pairs: (loss, stats, LoRA gradients), the pairs packed in
    one row through the varlen attention or scored one by one."""
    from lmtune.train.kernels import register_varlen_attention

    tokenizer = load_tokenizer(tiny_base)
    pairs = random_pairs(5, tokenizer.vocab_size)
    model = lora_model(tiny_base).to(device, dtype)
    if packed:
        model.get_base_model().set_attn_implementation(register_varlen_attention())
    with torch.no_grad(), model.disable_adapter():
        reference = scored(model, pairs, tokenizer.pad_token_id, packed, slots(method))
    reference["label"] = torch.tensor([True, False, True, True, False], device=device)  # kto's
    policy = scored(model, pairs, tokenizer.pad_token_id, packed, slots(method))
    loss, stats = preference_loss(
        method, policy, reference, beta=0.5, label_smoothing=0.1, gamma=0.3, desirable_weight=1.3
    )
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), stats, grads


def gradient_error(grads: dict, exact: dict) -> float:
    """Relative error of all LoRA gradients taken as one vector."""
    got = torch.cat([grads[name].flatten() for name in exact])
    want = torch.cat([g.flatten() for g in exact.values()])
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("method", METHODS)
def test_each_loss_and_every_lora_gradient_on_packed_rows_equal_the_pairs_scored_one_by_one(
    tiny_base, method
):
    packed_loss, packed_stats, packed_grads = loss_and_gradients(tiny_base, method, packed=True)
    alone_loss, alone_stats, alone_grads = loss_and_gradients(tiny_base, method, packed=False)
    assert packed_grads and all(g.abs().sum() > 0 for g in packed_grads.values())
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-7)
    # each gradient as a whole within 1e-5 of the other (elementwise, entries near zero differ in
    # their last fp32 bits: summation order)
    relative = {
        n: float((g - alone_grads[n]).norm() / alone_grads[n].norm()) for n, g in packed_grads.items()
    }
    assert max(relative.values()) < 1e-5, max(relative.items(), key=lambda item: item[1])
    for name, value in packed_stats.items():
        torch.testing.assert_close(
            value, alone_stats[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def logps_batch(count: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40, (2, count), generator=g)
    logps = -torch.rand((2, count), generator=g) * tokens * 2
    return {
        "chosen": logps[0],
        "rejected": logps[1],
        "chosen_tokens": tokens[0],
        "rejected_tokens": tokens[1],
    }


def test_simpo_and_orpo_equal_trls_cpo_and_orpo_losses():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    batch = logps_batch()
    mean_c = batch["chosen"] / batch["chosen_tokens"]
    mean_r = batch["rejected"] / batch["rejected_tokens"]
    trainer = SimpleNamespace(
        beta=2.0, label_smoothing=0.1, simpo_gamma=0.5, alpha=0.0, loss_type="simpo",
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    theirs, _, _ = CPOTrainer.cpo_loss(trainer, mean_c, mean_r)
    ours, _ = preference_loss("simpo", batch, None, beta=2.0, label_smoothing=0.1, gamma=0.5)
    torch.testing.assert_close(ours, theirs.mean())

    trainer.beta = 0.25
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, mean_c, mean_r)
    nll = -batch["chosen"].sum() / batch["chosen_tokens"].sum()  # trl's token-mean NLL of the chosen
    ours, _ = preference_loss("orpo", batch, None, beta=0.25)
    torch.testing.assert_close(ours, nll - ratio_losses.mean())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trls_dpo_trainer_on_the_same_batch(tiny_base, tmp_path, loss_type):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(tiny_base)
    model = lora_model(tiny_base)
    rows = [
        {"prompt": "To be, or", "chosen": " not to be", "rejected": " the question"},
        {"prompt": "HAMLET:", "chosen": " Whether tis nobler in the mind", "rejected": " slings"},
        {"prompt": "The", "chosen": " slings and arrows", "rejected": " outrageous fortune, or to"},
    ]
    args = DPOConfig(
        output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=len(rows), max_steps=1,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    model = trainer.model  # the PeftModel trl trains (it adds a frozen copy of the adapter as "ref")
    # trl's reference is that copy ("ref"); move the policy away from it
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B.default" in name:
                weight.add_(torch.randn_like(weight) * 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    theirs = trainer.compute_loss(trainer.model, batch)

    # the very token ids and response masks trl built, as lmtune's sequences, in one packed row
    from lmtune.train.kernels import register_varlen_attention

    seqs = []
    for ids, keep, learned in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True
    ):
        n = int(keep.sum())
        seqs.append(Sequence(ids[:n].tolist(), learned[:n].tolist()))
    # trl's batch is [chosen..., rejected...]
    pairs = list(zip(seqs[: len(rows)], seqs[len(rows) :], strict=True))
    model.get_base_model().set_attn_implementation(register_varlen_attention())
    with torch.no_grad():
        model.set_adapter("ref")
        reference = scored(model, pairs, tokenizer.pad_token_id, packed=True)
        model.set_adapter("default")
        policy = scored(model, pairs, tokenizer.pad_token_id, packed=True)
    assert not torch.allclose(policy["chosen"], reference["chosen"])
    ours, _ = preference_loss("dpo" if loss_type == "sigmoid" else "ipo", policy, reference, beta=0.3)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_kto_equals_trls_kto_trainer_on_the_same_batch(tiny_base, tmp_path):
    """The KTO loss on trl's own batch (its completions, its mismatched KL completions, its labels),
    the policy and reference scored by lmtune in one packed row, equals KTOTrainer's loss."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from lmtune.train.kernels import register_varlen_attention

    tokenizer = load_tokenizer(tiny_base)
    model = lora_model(tiny_base)
    rows = [
        {"prompt": "To be, or", "completion": " not to be", "label": True},
        {"prompt": "HAMLET:", "completion": " slings", "label": False},
        {"prompt": "The", "completion": " slings and arrows", "label": True},
        {"prompt": "Whether", "completion": " outrageous fortune, or to", "label": False},
    ]
    args = KTOConfig(
        output_dir=str(tmp_path), beta=0.3, desirable_weight=1.2, report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=len(rows), max_steps=1,
    )  # fmt: skip
    trainer = KTOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    model = trainer.model
    with torch.no_grad():  # move the policy away from trl's reference (the frozen copy "ref")
        for name, weight in model.named_parameters():
            if "lora_B.default" in name:
                weight.add_(torch.randn_like(weight) * 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    theirs = trainer.compute_loss(trainer.model, batch)

    def sequences(prefix: str) -> list[Sequence]:
        out = []
        for ids, keep, learned in zip(
            batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"],
            strict=True,
        ):  # fmt: skip
            kept = keep.bool()
            out.append(Sequence(ids[kept].tolist(), learned[kept].tolist()))
        return out

    items = list(zip(sequences(""), sequences("KL_"), strict=True))
    assert any(a != b for a, b in items)
    model.get_base_model().set_attn_implementation(register_varlen_attention())
    with torch.no_grad():
        model.set_adapter("ref")
        reference = scored(model, items, tokenizer.pad_token_id, True, slots("kto"))
        model.set_adapter("default")
        policy = scored(model, items, tokenizer.pad_token_id, True, slots("kto"))
    reference["label"] = torch.as_tensor(batch["label"], dtype=torch.bool)
    assert not torch.allclose(policy["completion"], reference["completion"])
    ours, stats = preference_loss("kto", policy, reference, beta=0.3, desirable_weight=1.2)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    assert float(stats["kl"]) >= 0


def test_kto_examples_unpair_pairs_and_take_a_kl_completion_of_another_prompt():
    from lmtune.align.pairs import kl_partners, read_pairs
    from lmtune.align.sources import unpaired_examples

    rows = read_pairs(
        [
            ({"prompt": "a?", "chosen": "yes", "rejected": "no"}, "f:1"),
            ({"prompt": "b?", "completion": "maybe", "label": False}, "f:2"),
            ({"prompt": "b?", "completion": "perhaps", "label": False}, "f:3"),
            ({"prompt": "c?", "chosen": "sure", "rejected": "never"}, "f:4"),
        ],
        paired=False,
    )
    examples = unpaired_examples(rows)
    assert [(e["completion"][0]["content"], e["label"]) for e in examples] == [
        ("yes", True), ("sure", True), ("no", False), ("maybe", False), ("perhaps", False), ("never", False),
    ]  # fmt: skip
    partners = kl_partners(examples)
    assert all(examples[j]["prompt"] != e["prompt"] for e, j in zip(examples, partners, strict=True))
    # the previous example, cyclically, unless it shares the prompt ("perhaps" skips "maybe": both b?)
    assert partners == [5, 0, 1, 2, 2, 4]
    with pytest.raises(AlignError, match="at least two prompts"):
        kl_partners(unpaired_examples(rows[:1]))


def test_preference_training_killed_midway_resumes_to_the_adapter_an_uninterrupted_run_writes(
    tiny_base, tmp_path, smoke_cfg
):
    from omegaconf import OmegaConf

    from lmtune.align.loop import train_preferences
    from lmtune.model.lora import lora_state

    tokenizer = load_tokenizer(tiny_base)
    pairs = random_pairs(12, tokenizer.vocab_size, seed=3)
    cfg = OmegaConf.merge(
        smoke_cfg,
        OmegaConf.create(
            {"align": {"method": "dpo", "max_steps": 4, "batch_size": 3, "checkpoint_every": 2}}
        ),
    )
    cfg.paths.base = str(tiny_base)
    model = lora_model(tiny_base)
    with torch.no_grad(), model.disable_adapter():
        reference = {
            k: v.numpy() for k, v in scored(model, pairs, tokenizer.pad_token_id, packed=False).items()
        }

    def trained(folder, on_step=None):
        model = lora_model(tiny_base)
        result = train_preferences(
            model, pairs, reference, cfg, False, folder, tokenizer.pad_token_id, on_step
        )
        return result, lora_state(model)

    uninterrupted, expected = trained(tmp_path / "whole")

    def killed(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path / "killed", killed)
    resumed, weights = trained(tmp_path / "killed")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert resumed["curve"] == uninterrupted["curve"]
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    assert uninterrupted["final"]["loss"] != pytest.approx(0.6931, abs=1e-4)  # it learned something


def test_the_shipped_pairs_never_train_against_a_held_out_answer_and_hold_out_the_sft_questions():
    from lmtune.align.sources import chatterbot_splits

    held = {"What is AI?", "Are you sentient?"}
    splits = chatterbot_splits(1337, 0.1, held)
    answer = lambda pair, side: pair[side][0]["content"].strip()  # noqa: E731
    asked = lambda pair: pair["prompt"][-1]["content"]  # noqa: E731
    train_chosen = {answer(p, "chosen") for p in splits["train"]}
    held_out_answers = {answer(p, "chosen") for p in splits["test"]} - train_chosen
    assert not held_out_answers & {answer(p, "rejected") for p in splits["train"]}
    assert not {asked(p) for p in splits["train"]} & {asked(p) for p in splits["test"]}
    assert {asked(p) for p in splits["test"]} >= held and len(splits["test"]) >= 10
    assert all(answer(p, "chosen") != answer(p, "rejected") for s in splits.values() for p in s)
    assert splits == chatterbot_splits(1337, 0.1, held)  # seeded: the same pairs every time


def test_align_method_set_alone_is_refused_and_the_group_switches_stages_and_adapter_together():
    from pathlib import Path

    from lmtune.config import ConfigError, validate
    from lmtune.pipeline.params import compose_conf

    conf = Path(__file__).resolve().parents[2] / "conf"
    with pytest.raises(ConfigError, match=r"align.method=dpo with .*switch with the group \(align=dpo\)"):
        validate(compose_conf(["align.method=dpo"], conf_dir=conf))
    cfg = validate(compose_conf(["align=simpo", "align.start=base"], conf_dir=conf))
    assert (list(cfg.align.stages.reference), list(cfg.align.stages.align)) == (["base"], ["simpo"])
    assert cfg.paths.tuned == cfg.paths.aligned
    default = validate(compose_conf([], conf_dir=conf))
    assert not default.align.stages.reference and default.paths.tuned == default.paths.adapter


def test_a_by_hand_adapter_folder_moves_the_adapter_merge_takes(monkeypatch):
    from pathlib import Path

    from lmtune.pipeline.runner import tuned_follows

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the committed params.yaml: align=none
    assert tuned_follows(["paths.adapter=/x/adapter"]) == [
        "paths.adapter=/x/adapter",
        "paths.tuned=/x/adapter",
        "paths.policy=/x/adapter",  # without RL, merge takes the tuned adapter
    ]
    assert tuned_follows(["paths.adapter=/x", "paths.tuned=/y"]) == [
        "paths.adapter=/x",
        "paths.tuned=/y",
        "paths.policy=/y",
    ]
    assert tuned_follows(["lora.r=8"]) == ["lora.r=8"]


def test_a_sweep_grid_over_method_and_beta_is_valid_and_a_method_key_alone_is_refused():
    """make sweep GRID="align=dpo,kto align.beta=0.1,0.3": four points, checked before any is
    queued; align.method=... alone would leave the stages behind, and says to use the group."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    grid = [sys.executable, "-m", "lmtune.pipeline.params", "--validate-grid", "experiment=smoke"]
    good = subprocess.run(
        [*grid, "align=dpo,kto", "align.beta=0.1,0.3"], cwd=root, capture_output=True, text=True
    )
    assert good.returncode == 0 and "4 valid experiments" in good.stdout + good.stderr
    bad = subprocess.run([*grid, "align.method=dpo,ipo"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "switch with the group (align=dpo)" in bad.stderr


def test_kto_renders_train_pairs_as_examples_and_keeps_held_out_pairs_as_pairs(tiny_base):
    from lmtune.align.sources import render_splits

    tokenizer = load_tokenizer(tiny_base)
    rows = read_pairs(
        [
            ({"prompt": "a?", "chosen": "yes", "rejected": "no"}, "f:1"),
            ({"prompt": "b?", "chosen": "sure", "rejected": "never"}, "f:2"),
            ({"prompt": "c?", "chosen": "fine", "rejected": "bad"}, "f:3"),
            ({"prompt": "d?", "completion": "ok", "label": True}, "f:4"),
        ],
        paired=False,
    )
    splits, seqs, left_out = render_splits({"train": rows[:2], "test": rows[2:3]}, tokenizer, 64, True, False)
    assert [e["label"] for e in splits["train"]] == [True, True, False, False] and left_out == 0
    assert "label" not in splits["test"][0]  # held-out pairs stay pairs
    completion, kl = seqs["train"][2]  # "no" under a?, and the KL completion "sure" (b?'s) under a?
    assert completion == response_sequence(rows[0]["prompt"], rows[0]["rejected"], tokenizer)
    assert kl == response_sequence(rows[0]["prompt"], rows[1]["chosen"], tokenizer)
    # a held-out split with an unpaired row is all examples
    splits, _, _ = render_splits({"train": rows[:2], "test": rows[2:]}, tokenizer, 64, True, False)
    assert [e["label"] for e in splits["test"]] == [True, True, False]
    splits, seqs, _ = render_splits({"train": rows[:2], "test": rows[2:3]}, tokenizer, 64, False, False)
    assert seqs["train"][0][1] == response_sequence(rows[0]["prompt"], rows[0]["rejected"], tokenizer)


def test_own_answers_replace_the_rejected_ones_and_a_pair_already_answered_is_left_out(tiny_base):
    from lmtune.align.loop import with_own_answers

    tokenizer = load_tokenizer(tiny_base)
    model = lora_model(tiny_base)
    questions = ("Who are you?", "What is blue?", "Why?")
    prompts = [[{"role": "user", "content": q}] for q in questions]

    def pair(prompt, chosen):
        reply = [{"role": "assistant", "content": chosen}]
        return {"prompt": prompt, "chosen": reply, "rejected": REJECTED, "where": prompt[0]["content"]}

    splits = {
        "train": [pair(prompts[0], "I am a bot."), pair(prompts[1], "A colour.")],
        "test": [pair(prompts[2], "Because.")],
    }
    own, left_out = with_own_answers(model, splits, tokenizer, max_new_tokens=8)
    assert [len(v) for v in own.values()] == [2, 1] and sum(left_out.values()) == 0
    for split, pairs in splits.items():  # chosen answers and prompts kept, the rejected one generated
        assert [(p["prompt"], p["chosen"]) for p in own[split]] == [(p["prompt"], p["chosen"]) for p in pairs]
    text = tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    by_hand = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(by_hand[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert own["train"][0]["rejected"] == [{"role": "assistant", "content": expected}]

    splits["train"][1] = pair(prompts[1], own["train"][1]["rejected"][0]["content"])  # the answer it gives
    again, left_out = with_own_answers(model, splits, tokenizer, max_new_tokens=8)
    assert [p["where"] for p in again["train"]] == ["Who are you?"]
    assert left_out == {"own_answer_is_the_chosen_one": 1, "own_answer_empty": 0}


def test_own_answers_for_unpaired_rows_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    import json

    from conftest import ROOT

    from lmtune.align.sources import load_splits
    from lmtune.pipeline.params import compose_conf

    monkeypatch.chdir(tmp_path)  # align.files are read relative to the repo root, under data.dir
    (tmp_path / "own").mkdir()
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(120)]
    (tmp_path / "own/kto.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    keys = ["align=kto", "align.source=files", "align.files=[own/kto.jsonl]", "data.dir=own"]
    assert len(load_splits(compose_conf(keys, conf_dir=ROOT / "conf"))["train"]) > 0
    with pytest.raises(AlignError, match="align.rejected=own replaces the rejected answer"):
        load_splits(compose_conf([*keys, "align.rejected=own"], conf_dir=ROOT / "conf"))

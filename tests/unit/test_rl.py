"""RL with verifiable rewards: the GRPO family's losses equal trl's GRPOTrainer on the same batch,
packed rows equal completions scored one by one, rewards are checked by name, and rollouts are
data: the same seed gives the same rollouts and adapter, a killed run resumes to it, and a replay
from the stored rollouts alone trains it again, byte for byte."""

import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmtune.checkpoint import load_tokenizer
from lmtune.data.sequences import Sequence
from lmtune.rl import RLError
from lmtune.rl.losses import advantages, grpo_loss
from lmtune.train.logps import token_logps

G, P, C = 2, 5, 6  # completions per prompt, prompt tokens, longest completion


def lora_model(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    # random A and B: a LoRA that already moves the logits
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0
    )
    return get_peft_model(model, config)


def batch(vocab: int):
    """Four completions of two prompts (the prompts of one length: trl left-pads, which shifts
    positions), completions of 6, 3, 5 and 1 tokens, advantages of both signs, and old and
    reference log-probabilities that differ from the policy's so that ratios are clipped."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (2, P), generator=g).repeat_interleave(G, 0)
    completions = torch.randint(3, vocab, (2 * G, C), generator=g)
    lengths = torch.tensor([6, 3, 5, 1])
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    return prompts, completions, mask, torch.tensor([1.0, -0.5, 0.3, -0.8])


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def ours(model, prompts, completions, mask, adv, old, ref, rl, temperature):
    lengths = mask.sum(1).tolist()
    seqs = [
        Sequence(p.tolist() + c[:n].tolist(), [0] * P + [1] * n)
        for p, c, n in zip(prompts, completions, lengths, strict=True)
    ]
    logps, _, _ = token_logps(model, seqs, pad_id=0, packed=True, temperature=temperature)
    grid = torch.zeros(mask.shape, dtype=logps.dtype).masked_scatter(mask.bool(), logps)
    return grpo_loss(grid, old, ref, adv, mask, rl, int(mask.sum()))


def assert_close_to_scale(got: dict, expected: dict, rel: float = 1e-5) -> None:
    """Every gradient within `rel` of its matrix's own scale (entries near 0 differ by rounding)."""
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(
            got[name], expected[name], rtol=rel, atol=rel * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


VARIANTS = [
    ("dapo", "token", 0.0, 1),
    ("grpo", "token", 0.0, 1),
    ("dr_grpo", "token", 0.0, 1),
    ("bnpo", "token", 0.0, 1),
    ("dapo", "token", 0.0, 2),  # several updates per rollout batch: old log-probabilities, clipping
    ("grpo", "sequence", 0.0, 2),  # GSPO
    ("dapo", "token", 0.05, 2),  # the KL term to the starting policy
    ("dr_grpo", "sequence", 0.05, 1),
]


@pytest.mark.parametrize("loss_type, level, beta, iterations", VARIANTS)
def test_each_variants_loss_and_every_lora_gradient_equal_trls_grpo_trainer(
    tiny_base, tmp_path, loss_type, level, beta, iterations
):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(tiny_base)
    model = lora_model(tiny_base)
    temperature, high = 0.9, 0.28
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2 * G,
        num_generations=G,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        max_completion_length=C,
        beta=0.0,  # trl would load a reference model; its log-probabilities are given instead
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon=0.2,
        epsilon_high=high,
        temperature=temperature,
        use_cpu=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * 4}),
        processing_class=tokenizer,
    )
    trainer.beta = beta
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    prompts, completions, mask, adv = batch(tokenizer.vocab_size)
    g = torch.Generator().manual_seed(1)
    noise = lambda: 0.3 * torch.randn(mask.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        current = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompts, completions], 1), torch.cat([torch.ones_like(prompts), mask], 1), C
        )[0]
    old = (current + noise()) * mask if iterations > 1 else None
    ref = (current + noise()) * mask if beta else None
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    expected = grads(model)
    rl = types.SimpleNamespace(
        loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, epsilon_high=high, beta=beta,
        max_completion_length=C,
    )  # fmt: skip
    loss, stats = ours(model, prompts, completions, mask, adv, old, ref, rl, temperature)
    loss.backward()
    got = grads(model)
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=0)
    assert got.keys() == expected.keys() and len(got) > 10
    assert_close_to_scale(got, expected)
    if iterations > 1:  # the batch was built so that ratios leave the clip range
        assert float(stats["clip_ratio/region_mean"]) > 0


def test_packed_rows_give_the_log_probabilities_and_gradients_of_completions_scored_one_by_one(tiny_base):
    model = lora_model(tiny_base)
    prompts, completions, mask, _ = batch(load_tokenizer(tiny_base).vocab_size)
    seqs = [
        Sequence(p.tolist() + c[:n].tolist(), [0] * P + [1] * n)
        for p, c, n in zip(prompts, completions, mask.sum(1).tolist(), strict=True)
    ]
    packed, owner, entropy = token_logps(model, seqs, 0, packed=True, temperature=0.7, entropy=True)
    (packed * torch.linspace(-1, 1, len(packed))).sum().backward()
    together = grads(model)
    alone = torch.cat([token_logps(model, [s], 0, packed=False, temperature=0.7)[0] for s in seqs])
    (alone * torch.linspace(-1, 1, len(alone))).sum().backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    assert_close_to_scale(together, grads(model))
    assert owner.tolist() == [i for i, n in enumerate(mask.sum(1).tolist()) for _ in range(n)]
    assert entropy.shape == packed.shape and (entropy > 0).all()


def test_advantages_are_group_relative_and_scaled_as_trl_scales_them():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64)  # two groups of two
    by_group = advantages(rewards, 2, "group")
    assert by_group[:2].tolist() == pytest.approx([0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4)])
    assert by_group[2:].tolist() == [0.0, 0.0]  # equal rewards: no signal
    assert advantages(rewards, 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0]  # Dr. GRPO
    std = float(rewards.std())
    assert advantages(rewards, 2, "batch")[0] == pytest.approx(0.5 / (std + 1e-4))


def test_eval_scores_greedy_accuracy_reward_length_and_pass_at_k_of_the_best_sample_per_question():
    from lmtune.rl.report import task_functions
    from lmtune.rl.rewards import reward_functions, task_reward

    task = types.SimpleNamespace(score_answer=lambda answer, entry: float(answer == entry["answer"]))
    rows = [{"index": i, "question": f"{i} + 1 =", "entry": {"answer": str(i + 1)}} for i in range(3)]
    greedy = ["1", "0", "<answer>3</answer>"]  # right, wrong, right
    samples = ["9", "1", "9", "9", "9", "9", "3", "3", "3"]  # k=3: a right one, none, all right
    f = task_functions(
        rows, greedy, [1, 1, 4], samples, 3, task_reward(task, "tags"),
        reward_functions({"task": 1.0, "format": 0.5}, task),
    )  # fmt: skip
    every = list(range(3))
    assert f["task_accuracy"](every) == pytest.approx(2 / 3)
    assert f["task_reward"](every) == pytest.approx((1 + 0 + 1.5) / 3)
    assert f["task_answer_tokens"](every) == 2.0
    assert f["task_pass_at_k"](every) == pytest.approx(2 / 3)
    assert f["task_pass_at_k"]([1, 1]) == 0.0 and f["task_pass_at_k"]([0, 2]) == 1.0  # per question
    assert "task_pass_at_k" not in task_functions(rows, greedy, [1, 1, 4], [], 3, task_reward(task), {})
    first_two = task_functions(rows, greedy, [1, 1, 4], samples[:6], 3, task_reward(task), {})
    assert first_two["task_pass_at_k"]([0, 1]) == 0.5  # samples of the first questions only


def test_rewards_that_raise_or_return_no_number_are_named_with_their_row_and_unknown_tasks_get_did_you_mean():
    from lmtune.rl.rewards import reward_functions, score
    from lmtune.rl.tasks import check_task

    module = types.ModuleType("lmtune_test_rewards")
    module.broken = lambda prompt, completion, row: 1 / 0
    module.wordy = lambda prompt, completion, row: "good"
    module.length = lambda prompt, completion, row: len(completion) / 10
    sys.modules["lmtune_test_rewards"] = module
    rows = [{"index": 7, "question": "1 + 1 =", "answer": "2", "entry": {"answer": "2"}}]
    task = types.SimpleNamespace(score_answer=lambda answer, entry: float(answer == entry["answer"]))
    functions = reward_functions({"task": 1.0, "format": 0.5, "lmtune_test_rewards:length": 2.0}, task)
    scores = score(functions, ["1 + 1 ="], ["so <answer>2</answer>"], rows)
    assert scores["task"] == [1.0] and scores["format"] == [1.0]
    assert scores["reward"] == [pytest.approx(1.0 + 0.5 + 2.0 * 2.1)]
    from lmtune.rl.rewards import answer_of

    assert answer_of("7 + 8 = 15, so <answer> 15 </answer>") == "15"
    assert answer_of("7 + 8 = 15.") == "7 + 8 = 15."  # tags: no tags, the whole completion
    assert answer_of("7 - 8 = -1.", "last_number") == "-1"
    assert answer_of("no number here", "last_number") == "no number here"
    with pytest.raises(RLError, match=r"reward lmtune_test_rewards:broken raised ZeroDivisionError.*row 7"):
        score(reward_functions({"lmtune_test_rewards:broken": 1.0}, task), ["q"], ["a"], rows)
    with pytest.raises(RLError, match=r"reward lmtune_test_rewards:wordy returned 'good' on row 7"):
        score(reward_functions({"lmtune_test_rewards:wordy": 1.0}, task), ["q"], ["a"], rows)
    with pytest.raises(RLError, match=r"lmtune_test_rewards has no function missing"):
        reward_functions({"lmtune_test_rewards:missing": 1.0}, task)
    with pytest.raises(
        RLError, match=r"rl.task=chain_summ: reasoning-gym has no such task \(did you mean chain_sum"
    ):
        check_task("chain_summ")


# ---- rollouts are data: seeded, resumable, replayable ----------------------------------------


def rl_cfg(smoke_cfg, tiny_base, **rl):
    smoke_cfg = OmegaConf.create(OmegaConf.to_container(smoke_cfg))  # not struct: rewards are a free dict
    cfg = OmegaConf.merge(
        smoke_cfg,
        {
            "rl": {
                "start": "base",
                "rewards": {"lmtune_test_rewards:length": 1.0, "format": 0.5},
                "max_steps": 4,
                "checkpoint_every": 2,
                "num_iterations": 2,
                "grad_accum": 2,
                "max_completion_length": 6,
                "num_generations": 2,
                "batch_size": 2,
                "train_prompts": 16,
                **rl,
            },
            "lora": {"lora_dropout": 0.1},  # dropout draws from the RNG training resumes and replays
        },
    )
    cfg.paths.base = str(tiny_base)
    return cfg


def trained(cfg, folder: Path, generate: bool = True, on_step=None, rollouts: Path | None = None):
    """RL on the tiny model; returns (sha256 of the adapter's weights, rollout folder)."""
    from lmtune.model.lora import lora_state
    from lmtune.rl.loop import start_policy, train_rl
    from lmtune.rl.rewards import reward_functions
    from lmtune.rl.tasks import load_task, prompt_ids

    module = types.ModuleType("lmtune_test_rewards")
    module.length = lambda prompt, completion, row: float(len(completion) % 3)  # varied: a signal
    sys.modules["lmtune_test_rewards"] = module
    task, rows, _ = load_task(cfg.rl, cfg.seed)
    tokenizer = load_tokenizer(cfg.paths.base)
    prompts = [prompt_ids(r["question"], cfg.rl, tokenizer) for r in rows]
    model, packed, as_started = start_policy(cfg)
    rollouts = rollouts or folder / "rollouts"
    train_rl(
        model, rows, prompts, reward_functions(cfg.rl.rewards, task), cfg, tokenizer, packed, rollouts,
        folder / "checkpoints", generate=generate, reference=as_started, on_step=on_step,
    )  # fmt: skip
    digest = hashlib.sha256()
    for name, value in sorted(lora_state(model).items()):
        digest.update(name.encode() + value.numpy().tobytes())
    return digest.hexdigest(), rollouts


def frames(folder: Path):
    import pandas as pd

    return [pd.read_parquet(p) for p in sorted(folder.glob("rollout_*.parquet"))]


def test_the_same_seed_gives_identical_rollouts_and_adapter_and_another_seed_does_not(
    smoke_cfg, tiny_base, tmp_path
):
    cfg = rl_cfg(smoke_cfg, tiny_base)
    first, rollouts = trained(cfg, tmp_path / "a")
    again, rollouts_again = trained(cfg, tmp_path / "b")
    assert first == again
    one, two = frames(rollouts), frames(rollouts_again)
    assert len(one) == 2  # 4 steps, 2 updates per rollout batch
    for a, b in zip(one, two, strict=True):
        assert a.drop(columns="generation_seconds").equals(b.drop(columns="generation_seconds"))
    batch = one[0]
    assert len(batch) == 4 and batch["reward"].std() > 0  # 2 prompts x 2 completions, a signal
    assert {"prompt_ids", "completion_ids", "reward/lmtune_test_rewards:length", "reward/format", "advantage", "old_logps", "seed"} <= set(batch.columns)  # fmt: skip
    other, _ = trained(OmegaConf.merge(cfg, {"seed": cfg.seed + 1}), tmp_path / "c")
    assert other != first


def test_a_run_killed_midway_resumes_to_the_adapter_of_an_unbroken_one(smoke_cfg, tiny_base, tmp_path):
    cfg = rl_cfg(smoke_cfg, tiny_base, beta=0.05)  # the KL term: reference log-probabilities stored too
    unbroken, _ = trained(cfg, tmp_path / "whole")

    def killed(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained(cfg, tmp_path / "killed", on_step=killed)
    assert (tmp_path / "killed/rollouts/rollout_00001.parquet").is_file()  # sampled before the kill
    resumed, _ = trained(cfg, tmp_path / "killed")
    assert resumed == unbroken


def test_replay_from_the_stored_rollouts_alone_trains_the_same_adapter(
    smoke_cfg, tiny_base, tmp_path, monkeypatch
):
    from lmtune.rl import rollouts as rollout_module

    cfg = rl_cfg(smoke_cfg, tiny_base)
    original, stored = trained(cfg, tmp_path / "run")

    def no_sampling(*args, **kwargs):
        raise AssertionError("replay generated")

    monkeypatch.setattr(rollout_module, "sampled_completions", no_sampling)
    replayed, _ = trained(cfg, tmp_path / "replay", generate=False, rollouts=stored)
    assert replayed == original
    (stored / "rollout_00001.parquet").unlink()
    with pytest.raises(
        RLError, match=r"rollout_00001\.parquet is missing: replay trains on stored rollouts only"
    ):
        trained(cfg, tmp_path / "replay2", generate=False, rollouts=stored)


@pytest.mark.parametrize(
    ("overrides", "forms"),
    [
        ([], ["base", "base_4bit", "base_4bit_adapter"]),
        (["rl=grpo"], ["base", "base_4bit", "base_4bit_sft", "base_4bit_adapter"]),
        (["rl=grpo", "rl.start=base"], ["base", "base_4bit", "base_4bit_adapter"]),
        (
            ["align=dpo", "rl=grpo"],
            ["base", "base_4bit", "base_4bit_sft", "base_4bit_aligned", "base_4bit_adapter"],
        ),
    ],
)
def test_eval_scores_the_adapter_rl_started_from_beside_the_one_it_trained(overrides, forms):
    from lmtune.config import validate
    from lmtune.evaluate.forms import model_loaders
    from lmtune.pipeline.params import compose_conf

    cfg = validate(compose_conf(overrides, conf_dir=Path(__file__).resolve().parents[2] / "conf"))
    names = list(model_loaders(cfg, torch.bfloat16))
    assert names[:-2] == forms and names[-2] == "merged"  # then the post-training-quantized form


def test_benchmarks_on_a_starting_adapter_the_configuration_does_not_score_are_refused_by_name():
    from lmtune.config import ConfigError, validate
    from lmtune.pipeline.params import compose_conf

    conf = Path(__file__).resolve().parents[2] / "conf"
    with pytest.raises(
        ConfigError, match=r"eval.benchmark_models: sft is no model this configuration scores"
    ):
        validate(compose_conf(["eval.benchmark_models=[merged,quantized,sft]"], conf_dir=conf))
    with pytest.raises(ConfigError, match=r"eval.benchmark_models: aligned is no model"):
        validate(compose_conf(["rl=grpo", "eval.benchmark_models=[merged,quantized,aligned]"], conf_dir=conf))
    validate(compose_conf(["rl=grpo", "eval.benchmark_models=[merged,quantized,sft]"], conf_dir=conf))


def test_a_micro_batch_whose_completions_are_all_masked_has_no_tokens_and_still_a_graph(tiny_base):
    model = lora_model(tiny_base)
    seqs = [Sequence([5, 6, 7, 8], [0, 0, 0, 0]), Sequence([9, 10, 11], [0, 0, 0])]
    logps, owner, entropy = token_logps(model, seqs, 0, packed=True, entropy=True)
    assert logps.shape == owner.shape == entropy.shape == (0,)
    logps.sum().backward()  # a zero loss, as a step of truncated completions masked out gives

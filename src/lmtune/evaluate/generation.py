"""Batched generation with the KV cache, and the side-by-side samples page."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from lmtune.model.hardware import device


def decoding(cfg: DictConfig, pad_token_id: int) -> dict:
    """generate()'s decoding arguments from a `sample:` section (sampling settings only when sampling)."""
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else None,
        top_p=cfg.top_p if cfg.do_sample else None,
        repetition_penalty=cfg.repetition_penalty,
        pad_token_id=pad_token_id,
    )


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], cfg: DictConfig, seed: int, rendered: bool = False
) -> list[dict]:
    """Continue each prompt; batches are left-padded so every row ends where generation starts.
    `rendered`: the prompts come from the chat template, which already holds its special tokens."""
    model.eval()
    model.config.use_cache = True
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)  # same seed for every model compared: differences come from weights
    results = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not rendered).to(
            device()
        )
        began = time.perf_counter()
        output = model.generate(**inputs, **decoding(cfg, tokenizer.pad_token_id), use_cache=True)
        seconds = time.perf_counter() - began
        new = output[:, inputs["input_ids"].shape[1] :]
        for prompt, ids in zip(chunk, new, strict=True):
            ids = ids[ids != tokenizer.pad_token_id]
            results.append(
                {
                    "prompt": prompt,
                    "completion": tokenizer.decode(ids, skip_special_tokens=True),
                    "new_tokens": int(ids.numel()),
                    "batch": start // cfg.batch_size,
                    "batch_seconds": seconds,
                }
            )
    return results


def tokens_per_second(rows: list[dict]) -> float:
    seconds = sum({r["batch"]: r["batch_seconds"] for r in rows}.values())  # once per batch
    return sum(r["new_tokens"] for r in rows) / max(seconds, 1e-9)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def samples_markdown(
    base: list[dict],
    tuned: list[dict],
    settings: dict,
    title: str,
    shown: list[str],
    references: list[str | None],
) -> str:
    """A page a person reads: each prompt (or question), the reference where the data has one, then
    the base and fine-tuned continuations (or answers) side by side."""
    lines = [
        f"# Samples: {title}",
        "",
        "Generation settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
        "",
    ]
    lines += ["| Prompt | Reference | Base model | Fine-tuned |", "|---|---|---|---|"]
    for prompt, reference, b, t in zip(shown, references, base, tuned, strict=True):
        lines.append(
            f"| {_cell(prompt)} | {_cell(reference) if reference else '—'} | {_cell(b['completion'])} "
            f"| {_cell(t['completion'])} |"
        )
    lines += [
        "",
        f"Speed: base {tokens_per_second(base):.1f} tokens/s, fine-tuned {tokens_per_second(tuned):.1f} tokens/s "
        f"(batch {settings.get('batch_size')}, KV cache, {device()}).",
        "",
    ]
    return "\n".join(lines)


@torch.no_grad()
def greedy_continuations(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy continuation of each token-id prompt (batched, left-padded, KV cache); stops at EOS."""
    from tqdm.auto import tqdm

    from lmtune.data.batching import collate

    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=f"{desc}: generate", unit="batch", leave=False):
        rows = order[start : start + batch_size]
        batch = collate([prompts[i] for i in rows], pad_id, left_pad=True)
        generated = model.generate(
            input_ids=batch["input_ids"].to(device()),
            attention_mask=batch["attention_mask"].to(device()),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            use_cache=True,
        )[:, batch["input_ids"].shape[1] :]
        for row, ids in zip(rows, generated.tolist(), strict=True):
            outputs[row] = ids[: ids.index(eos_id)] if eos_id in ids else ids
    return outputs


@torch.no_grad()
def sampled_completions(
    model, prompts: list[list[int]], n: int, sampling: DictConfig, tokenizer, seed: int
) -> list[list[int]]:
    """`n` completions of each token-id prompt (prompt-major), each cut after its first EOS (kept)
    or at sampling.max_completion_length; sampled with sampling.temperature and sampling.top_p in
    one batch, KV cache on, under `seed` in a forked random state (the caller's stays untouched)."""
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding: every prompt ends where generation starts
        ids[i, width - len(row) :] = torch.tensor(row)
        attention[i, width - len(row) :] = 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_completion_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
    completions = []
    for row in out[:, width:].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        completions.append(row[:end])
    return completions

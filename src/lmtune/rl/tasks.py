"""A task's prompts: reasoning-gym's procedural data sets (seeded, offline, each with its own
scorer), split into training prompts and held-out ones that never share a question."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf

from lmtune.rl import RLError


def task_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_task(name: str) -> None:
    """An unknown task is refused before any model loads, with the closest names."""
    names = task_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RLError(f"rl.task={name}: reasoning-gym has no such task{hint}; {len(names)} tasks exist")


def load_task(rl: DictConfig, seed: int) -> tuple[object, list[dict], list[dict]]:
    """(the task's data set, whose score_answer is the reward; training rows; held-out rows). Rows:
    {index, question, answer, entry}. Held-out questions are drawn with another seed; any that is
    also a training question, or came before, is left out."""
    import reasoning_gym

    check_task(rl.task)
    options = OmegaConf.to_container(rl.task_config, resolve=True) or {}
    try:
        train = reasoning_gym.create_dataset(rl.task, size=rl.train_prompts, seed=seed, **options)
        test = reasoning_gym.create_dataset(rl.task, size=rl.test_prompts, seed=seed + 1_000_003, **options)
    except (TypeError, AssertionError, ValueError) as err:
        raise RLError(f"rl.task_config={options}: {rl.task} refuses it ({err})") from None
    train_rows = [
        {"index": i, "question": e["question"], "answer": e["answer"], "entry": e}
        for i, e in enumerate(train)
    ]
    seen, test_rows = {r["question"] for r in train_rows}, []
    for i, e in enumerate(test):  # each held-out question once, and never a training one
        if e["question"] not in seen:
            seen.add(e["question"])
            test_rows.append({"index": i, "question": e["question"], "answer": e["answer"], "entry": e})
    if len(test_rows) < 2:
        raise RLError(
            f"rl.task={rl.task}: only {len(test_rows)} held-out questions differ from the training ones; "
            "raise rl.test_prompts or make the task harder (rl.task_config)"
        )
    return train, train_rows, test_rows


def prompt_ids(question: str, rl: DictConfig, tokenizer) -> list[int]:
    """The question as the model is asked it: the system prompt (the answer format) and the
    question as the user's turn, rendered by the chat template for a reply."""
    messages = [{"role": "user", "content": question}]
    if rl.system_prompt:
        messages.insert(0, {"role": "system", "content": rl.system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

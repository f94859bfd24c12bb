"""A terminal chat with the fine-tuned model, for a person to try it (`make chat`).

    python -m lmtune.cli.chat [--compare] [--max-new-tokens N] [key=value ...]

Each line typed (or piped in) is a user turn; the reply streams token by token, rendered with the
model's chat template and continuing the conversation. --compare answers each turn with the base
model too, one after the other, each keeping its own history. Decoding follows `sample:` (its
seed, sampling, temperature, top_p, repetition penalty). An empty line or end of input quits.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import torch
from omegaconf import DictConfig

from lmtune import LmtuneError


class Chat:
    """One model, its tokenizer and its conversation so far."""

    def __init__(self, label: str, path: str, cfg: DictConfig):
        from lmtune.checkpoint import load_tokenizer
        from lmtune.model.hardware import resolve_dtype
        from lmtune.model.load import load_full

        self.label, self.cfg, self.history = label, cfg, []
        if not (Path(path) / "config.json").is_file():  # else transformers would look for it on the hub
            raise LmtuneError(f"{path} holds no model: run the pipeline first (make run), or dvc pull it")
        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.chat_template is None:
            raise LmtuneError(
                f"{path}: the tokenizer has no chat template; set model.chat_template and rerun base"
            )
        self.model = load_full(path, resolve_dtype(cfg.sample.dtype))

    def reply(self, text: str, out=sys.stdout) -> str:
        """Stream the answer to `text` to `out` as it is generated; returns it."""
        from transformers import TextIteratorStreamer

        from lmtune.evaluate.generation import decoding
        from lmtune.model.hardware import device

        self.history.append({"role": "user", "content": text})
        ids = self.tokenizer.apply_chat_template(
            self.history, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(device())
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(self.cfg.seed)
        options = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            **decoding(self.cfg.sample, self.tokenizer.pad_token_id),
        )
        worker = threading.Thread(target=self.model.generate, kwargs=options)
        worker.start()
        out.write(f"{self.label}> ")
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            out.write(piece)
            out.flush()
        worker.join()
        out.write("\n")
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def main(argv: list[str]) -> int:
    from lmtune.config import load

    parser = argparse.ArgumentParser(prog="python -m lmtune.cli.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true", help="answer with the base model too")
    parser.add_argument(
        "--max-new-tokens", type=int, help="reply length cap (default: sample.max_new_tokens)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load(
            args.overrides + ([f"sample.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else [])
        )
        models = [Chat("fine-tuned", cfg.paths.merged, cfg)]
        if args.compare:
            models.insert(0, Chat("base", cfg.paths.base, cfg))
    except (LmtuneError, OSError) as err:
        print(f"error: {err} (run `make run` first to build the models)", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {' and '.join(m.label for m in models)}; an empty line quits")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        if not interactive:
            print(f"you> {line.strip()}")
        for model in models:
            model.reply(line.strip())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

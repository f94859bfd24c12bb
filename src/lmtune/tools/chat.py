"""A terminal chat with the fine-tuned model, for a person to try it (`make chat`).

    python -m lmtune.tools.chat [--compare] [--max-new-tokens N] [key=value ...]

Each line typed (or piped in) is a user turn; the reply streams token by token, rendered with the
model's chat template and continuing the conversation. --compare answers each turn with the base
model too, one after the other, each keeping its own history. Decoding follows `sample:` (its
seed, sampling, temperature, top_p, repetition penalty). Typed lines can be edited (readline); an
empty line, Ctrl-D or Ctrl-C at the prompt quits; Ctrl-C during a reply stops that reply. Piped
input skips blank lines and ends at end of input. When the conversation no longer fits the model's
context with room for a reply, its oldest turns are dropped, and the chat says so.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path

import torch
from omegaconf import DictConfig

from lmtune import LmtuneError
from lmtune.pipeline.params import no_model


class Chat:
    """One model, its tokenizer and its conversation so far."""

    def __init__(self, label: str, path: str, cfg: DictConfig):
        from lmtune.checkpoint import load_tokenizer
        from lmtune.model.hardware import resolve_dtype
        from lmtune.model.load import load_full

        self.label, self.cfg, self.history = label, cfg, []
        if not (Path(path) / "config.json").is_file():  # else transformers would look for it on the hub
            raise LmtuneError(no_model(path))
        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.chat_template is None:
            raise LmtuneError(
                f"{path}: the tokenizer has no chat template; set model.chat_template and rerun base"
            )
        self.model = load_full(path, resolve_dtype(cfg.sample.dtype))

    def context(self) -> int:
        """Tokens the model attends over: its position table, else what its tokenizer declares."""
        return getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length

    def prompt(self) -> torch.Tensor:
        """The conversation rendered for a reply, its oldest exchanges dropped (with a note) while it
        leaves less than sample.max_new_tokens of the context."""
        room = self.context() - self.cfg.sample.max_new_tokens
        dropped = 0
        while True:
            ids = self.tokenizer.apply_chat_template(
                self.history, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            if ids.shape[1] <= room:
                break
            if len(self.history) <= 1:
                self.history.clear()
                raise LmtuneError(
                    f"that message is {ids.shape[1]} tokens; with a {self.cfg.sample.max_new_tokens}-token "
                    f"reply it does not fit the model's {self.context()}-token context: send a shorter one"
                )
            del self.history[:2]  # the oldest user turn and its answer
            dropped += 2
        if dropped:
            print(
                f"({self.label}: the {dropped} oldest turns no longer fit the model's context and were dropped)"
            )
        return ids

    def reply(self, text: str, out=None) -> str:
        """Stream the answer to `text` to `out` as it is generated; returns it. Ctrl-C stops the
        reply where it is (what was said so far stays in the conversation)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from lmtune.evaluate.generation import decoding
        from lmtune.model.hardware import device

        out = out or sys.stdout
        self.history.append({"role": "user", "content": text})
        ids = self.prompt().to(device())
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full(
                    (input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device
                )

        torch.manual_seed(self.cfg.seed)
        options = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
            **decoding(self.cfg.sample, self.tokenizer.pad_token_id),
        )
        worker = threading.Thread(target=self.model.generate, kwargs=options)
        worker.start()
        out.write(f"{self.label}> ")
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stop.set()
            for piece in streamer:  # what was generated before generate() saw the stop
                pieces.append(piece)
            out.write(" [stopped]")
        worker.join()
        out.write("\n")
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def turns(interactive: bool):
    """The user's lines: typed at a `you>` prompt (editable, with history), or read from a pipe
    (blank lines skipped, each echoed after `you>`). Ends at an empty typed line or end of input."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() then edits lines and recalls earlier ones)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return
            if not line:
                return
            yield line
    else:
        for line in sys.stdin:
            if line.strip():
                print(f"you> {line.strip()}")
                yield line.strip()


def main(argv: list[str]) -> int:
    from lmtune.config import load

    parser = argparse.ArgumentParser(prog="python -m lmtune.tools.chat", description=__doc__.splitlines()[0])
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
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err} (run `make run` first to build the models)", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {' and '.join(m.label for m in models)}; an empty line or Ctrl-D quits")
    try:
        for line in turns(interactive):
            for model in models:
                try:
                    model.reply(line)
                except LmtuneError as err:
                    print(f"\n{model.label}: {err}", file=sys.stderr)
    except KeyboardInterrupt:  # at the prompt: leave quietly
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

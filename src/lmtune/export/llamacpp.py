"""A GGUF file run by llama.cpp (llama-cpp-python): evaluate scores an exported model in the runtime
its users will run it in, not in transformers' GGUF reader, which dequantizes to plain tensors.

Token ids go in as the test split holds them, so the scores compare weights, not tokenizers; the
tokenizer llama.cpp reads from the file is checked against transformers' by the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


class GGUFModel:
    """One llama.cpp context over a GGUF file, with logits kept for every position (for scoring)."""

    def __init__(self, path: str | Path, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            logits_all=True,
            n_threads=torch.get_num_threads(),
            verbose=False,
        )

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32: position i's logits predict ids[i + 1]."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def likelihood_per_passage(self, seqs: list[list[int]], desc: str = "score") -> dict[str, np.ndarray]:
        """As metrics.likelihood_per_passage: summed NLL, tokens predicted and top-1 hits per passage,
        counting the tokens a sequence's mask keeps (all of them where it has none)."""
        nll, hits, count = np.zeros(len(seqs)), np.zeros(len(seqs)), np.zeros(len(seqs))
        for i, seq in enumerate(tqdm(seqs, desc=f"{desc}: likelihood", unit="passage", leave=False)):
            logits = self.logits(seq)[:-1]
            targets = torch.tensor(seq[1:])
            mask = getattr(seq, "mask", None)
            keep = torch.ones(len(targets), dtype=torch.bool) if mask is None else torch.tensor(mask[1:]) > 0
            token_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            nll[i] = float(token_nll[keep].sum())
            hits[i] = int(((logits.argmax(-1) == targets) & keep).sum())
            count[i] = int(keep.sum())
        return {"nll": nll, "hits": hits, "count": count}

    def greedy_continuations(
        self, prompts: list[list[int]], max_new_tokens: int, eos_id: int, desc: str = "generate"
    ) -> list[list[int]]:
        """As generation.greedy_continuations: greedy decoding of each prompt, stopping at EOS."""
        outputs = []
        for prompt in tqdm(prompts, desc=f"{desc}: generate", unit="prompt", leave=False):
            new: list[int] = []
            for token in self.llm.generate(list(prompt), temp=0.0, repeat_penalty=1.0, reset=True):
                if token == eos_id or len(new) == max_new_tokens:
                    break
                new.append(token)
            outputs.append(new)
        return outputs

    def close(self) -> None:
        self.llm.close()

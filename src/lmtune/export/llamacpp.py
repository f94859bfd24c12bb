"""A GGUF file run by llama.cpp (llama-cpp-python): evaluate scores an exported model in the runtime
its users will run it in, not in transformers' GGUF reader, which dequantizes to plain tensors.

Token ids go in as the test split holds them, so the scores compare weights, not tokenizers; the
tokenizer llama.cpp reads from the file is checked against transformers' by the tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmtune import LmtuneError

PROBE_TOKENS = 4  # decoded by the probe: enough to run every kind of matrix product once


class LlamaCppError(LmtuneError):
    """llama.cpp cannot run a GGUF on this machine: the cause and the fix, in one line."""


def system_info() -> str:
    """llama.cpp's own line of the features its CPU backend was built with (`AMX_INT8 = 1`, ...)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def _probe_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "lmtune.export.llamacpp", str(path)]


@cache
def _decodes(path: Path, stamp: tuple[int, int]) -> None:
    probe = subprocess.run(_probe_command(path), capture_output=True, text=True, timeout=600)
    if probe.returncode == 0:
        return
    if probe.returncode < 0:  # killed by a signal: a crash inside llama.cpp
        crash = signal.Signals(-probe.returncode).name
        info = system_info()
        cause = (
            "this llama.cpp build has ggml's AMX backend (AMX_INT8 = 1 in its system info), which crashes "
            "on quantized weights on AMX CPUs; rebuild it without: rm -f .venv/.llama-build && make setup"
            if "AMX_INT8 = 1" in info
            else f"llama.cpp itself fails on this CPU ({info[:160]}); an f16 export (quantize=gguf_f16) "
            "uses other kernels"
        )
        raise LlamaCppError(f"llama.cpp crashed ({crash}) decoding {path}: {cause}")
    said = (probe.stderr.strip().splitlines() or ["no message"])[-1]
    raise LlamaCppError(f"llama.cpp cannot run {path}: {said}; export it again (dvc repro quantize)")


def check_decodes(path: str | Path) -> None:
    """Load the GGUF and decode a few tokens in a child process, so that a native crash (a
    segfault in one of llama.cpp's CPU kernels) becomes a LlamaCppError naming the cause and the
    fix, not a dead server or stage. Checked once per file version in a process."""
    path = Path(path).resolve()
    if not path.is_file():
        raise LlamaCppError(f"{path}: no such GGUF file")
    _decodes(path, (path.stat().st_size, path.stat().st_mtime_ns))


def _probe(path: str) -> None:
    """The child of check_decodes: greedy decoding of PROBE_TOKENS tokens after the BOS/EOS token."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, verbose=False)
    start = llm.token_bos() if llm.token_bos() >= 0 else llm.token_eos()
    for _, _token in zip(range(PROBE_TOKENS), llm.generate([start], temp=0.0), strict=False):
        pass
    llm.close()


class GGUFModel:
    """One llama.cpp context over a GGUF file, with logits kept for every position (for scoring)."""

    def __init__(self, path: str | Path, n_ctx: int):
        import llama_cpp

        check_decodes(path)  # a crash in a child process is an error here, not a dead stage
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

    def sampled_continuations(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, eos_id: int, sampling, seed: int,
        desc: str = "sample",
    ) -> list[list[int]]:  # fmt: skip
        """`n` answers to each prompt (prompt-major), sampled by llama.cpp's own sampler with
        `sampling.temperature` and `sampling.top_p` (no top-k, no min-p), seeded: the same file and
        seed give the same answers. Each stops at EOS (not kept) or after `max_new_tokens`."""
        outputs = []
        for prompt in tqdm(prompts, desc=f"{desc}: sample", unit="prompt", leave=False):
            for _ in range(n):
                # llama.cpp seeds a fresh sampler on every generate(): one seed per answer; a
                # reset context, so no answer reuses the cache another call left
                self.llm.set_seed((seed + len(outputs)) % 2**32)
                self.llm.reset()
                new: list[int] = []
                for token in self.llm.generate(
                    list(prompt), temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                    repeat_penalty=1.0, reset=True,
                ):  # fmt: skip
                    if token == eos_id or len(new) == max_new_tokens:
                        break
                    new.append(token)
                outputs.append(new)
        return outputs

    def close(self) -> None:
        self.llm.close()


if __name__ == "__main__":  # check_decodes' child process
    _probe(sys.argv[1])

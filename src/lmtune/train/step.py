"""One training micro-batch: the seeded batches (packed rows or padded), moved to the device, and
the loss through the configured attention and loss kernels."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lmtune.data.batching import batch_indices, collate, collate_rows, pack
from lmtune.model.hardware import device
from lmtune.model.head import head_transform, plain_head
from lmtune.train.kernels import chunked_cross_entropy, packed_segments, register_varlen_attention


def collate_micro_batch(picked: list[list[int]], tc: DictConfig, pad_id: int) -> dict:
    """One micro-batch's tensors from its passages. Packed or padded, it holds the same passages;
    packing only removes the padding. With varlen attention, whose cost does not depend on row
    length, they go in one row; the sdpa path packs them into rows of train.pack_length to bound
    its dense mask."""
    if not tc.packing:
        return collate(picked, pad_id)
    return collate_rows([picked] if tc.attention == "varlen" else pack(picked, tc.pack_length), pad_id)


def batch_maker(train_seqs: list[list[int]], cfg: DictConfig, pad_id: int):
    """index → (micro-batch tensors, useful tokens): a pure function of (seed, index), so a resumed
    run sees the same data; train.batch_size passages per micro-batch."""
    tc = cfg.train

    def make(index: int) -> tuple[dict, int]:
        picked = [train_seqs[i] for i in batch_indices(len(train_seqs), tc.batch_size, cfg.seed, index)]
        return collate_micro_batch(picked, tc, pad_id), sum(len(s) for s in picked)

    return make


def to_device(batch: dict | None) -> dict | None:
    """Host tensors to the training device; on a GPU from pinned memory, without blocking the host."""
    if batch is None or device().type != "cuda":
        return batch
    return {
        k: v.pin_memory().to(device(), non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def prepare_model(model, tc: DictConfig) -> None:
    """Packed rows get per-passage (varlen) attention when train.attention=varlen."""
    if tc.packing and tc.attention == "varlen":
        model.get_base_model().set_attn_implementation(register_varlen_attention())


def micro_batch_loss(model, batch: dict, tc: DictConfig, segments: dict | None = None) -> torch.Tensor:
    """Mean next-token loss of one micro-batch. Packed rows pass their passage boundaries
    (`segments`, from packed_segments on the host batch) down to the attention; with
    train.chunked_loss a frozen plain head computes its loss in chunks (with the family's logit
    scale or cap). No KV cache: with one, transformers ignores the packed positions and rows
    attend across."""
    extra = segments or {}
    if segments is None and "position_ids" in batch:
        extra = packed_segments(batch["position_ids"].cpu())
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel | FullyShardedDataParallel):
        # through the wrapper's own forward, which gradient synchronisation hooks into
        return model(**batch, use_cache=False, **extra).loss
    base = model.get_base_model()
    head = base.get_output_embeddings()
    if tc.chunked_loss and plain_head(head) and not head.weight.requires_grad:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = base.base_model(**inputs, use_cache=False, **extra).last_hidden_state
        scale, softcap = head_transform(base.config)
        return chunked_cross_entropy(hidden, head.weight, batch["labels"], scale=scale, softcap=softcap)
    return model(**batch, use_cache=False, **extra).loss

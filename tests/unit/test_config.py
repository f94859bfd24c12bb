from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmtune.config import Config, ConfigError, flatten, load
from lmtune.pipeline.params import (
    LAUNCH_CONFIGS,
    ParamsModified,
    compose_conf,
    main,
    read_header,
    write_params,
)
from lmtune.track.run_params import safe_params

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def group_options():
    # conf/accelerate/, conf/slurm/ and conf/skypilot/ hold launch configs, not Hydra groups
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in LAUNCH_CONFIGS):
        for option in sorted(group.glob("*.yaml")):
            yield f"{group.name}={option.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_conf_option_composes_and_validates(override):
    needs = {
        "data=files": ["data.files=[corpus.jsonl]"],
        "data=hub": ["data.hub_id=someone/data"],
    }  # the user completes
    cfg = compose_conf([override, *needs.get(override, [])], conf_dir=CONF)
    group, option = override.split("=")
    if group in ("model", "data"):
        assert cfg[group].name == option


def test_default_is_qlora_nf4_on_the_shipped_model():
    cfg = compose_conf([], conf_dir=CONF)
    assert (cfg.model.source, cfg.quant.bits, cfg.quant.bnb_4bit_quant_type) == ("gguf", 4, "nf4")
    assert cfg.quant.bnb_4bit_use_double_quant and cfg.lora.target_modules == "all-linear"
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize(
    "override, names",
    [
        ("+lora.rank=8", "lora.rank"),
        ("lora.r=abc", "lora.r"),
        ("lora.r=0", "lora.r"),
        ("quant.bits=3", "quant.bits"),
        ("quant.bnb_4bit_quant_type=int3", "quant.bnb_4bit_quant_type"),
        ("train.batch_size=-1", "train.batch_size"),
        ("train.pack_length=128", "train.pack_length"),
        ("train.gradient_checkpointing=sometimes", "train.gradient_checkpointing"),
        ("train.recompute_every_n_layers=0", "train.recompute_every_n_layers"),
        ("train.memory_budget_gib=-4", "train.memory_budget_gib"),
        ("data.test_fraction=0.99", "data.test_fraction"),
        ("model=llama2_7b model.path=null", "model.path"),
    ],
)
def test_bad_config_fails_naming_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        compose_conf(override.split(), conf_dir=CONF)


def test_unknown_key_in_params_yaml_fails_before_anything_loads(tmp_path):
    cfg = OmegaConf.to_container(compose_conf([], conf_dir=CONF))
    cfg["train"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load([], root=tmp_path)


def test_stage_overrides_apply_on_top_of_params_yaml(tmp_path):
    write_params(compose_conf([], conf_dir=CONF), tmp_path / "params.yaml")
    cfg = load(["lora.r=8", "train.max_steps=3"], root=tmp_path)
    assert (cfg.lora.r, cfg.train.max_steps) == (8, 3)
    with pytest.raises(ConfigError, match=r"lora\.nope"):
        load(["lora.nope=1"], root=tmp_path)


def test_recomposing_refuses_to_wipe_values_from_elsewhere(tmp_path):
    path = tmp_path / "params.yaml"
    write_params(compose_conf([], conf_dir=CONF), path, [])
    assert read_header(path) == ([], True)
    # `dvc exp run -S lora.r=8` / `dvc exp apply` rewrite params.yaml without our header
    edited = OmegaConf.load(path)
    edited.lora.r = 8
    path.write_text(OmegaConf.to_yaml(edited))
    with pytest.raises(ParamsModified, match=r"r: 8"):
        write_params(compose_conf([], conf_dir=CONF), path, [])
    assert OmegaConf.load(path).lora.r == 8  # untouched
    write_params(compose_conf([], conf_dir=CONF), path, [], force=True)
    assert OmegaConf.load(path).lora.r == 16


def test_keep_recomposes_with_the_recorded_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").symlink_to(CONF)
    assert main(["experiment=smoke"]) == 0
    assert main(["--keep"]) == 0  # what `make run` does
    assert OmegaConf.load("params.yaml").model.name == "tiny_random"
    assert read_header(Path("params.yaml")) == (["experiment=smoke"], True)


def test_flatten_and_secrets_never_logged():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {"a.b": 1, "a.c.d": "x", "e": None}
    cfg = OmegaConf.create(
        {
            "tracking": {"hf_token": "hf_abc", "uri": "x", "token": "t"},
            "db": {"password": "p", "api_key": "k"},
        }
    )
    params = safe_params(cfg)
    assert params["tracking.hf_token"] == params["tracking.token"] == "***"
    assert params["db.password"] == params["db.api_key"] == "***"
    assert params["tracking.uri"] == "x"
    # real parameters whose names merely contain "token" are logged as they are
    shown = safe_params(compose_conf([], conf_dir=CONF))
    assert shown["eval.prompt_tokens"] == 32 and shown["sample.max_new_tokens"] == 64
    assert "***" not in shown.values()


def test_conf_is_the_one_source_of_defaults():
    """The schema declares types and allowed values, never a value: a default there would be a
    second source of truth that drifts from conf/. Every key then has to come from conf/."""
    schema = OmegaConf.structured(Config)

    def leaves(node, prefix=""):
        for key in node:
            path = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                yield path, "???"
            elif OmegaConf.is_config(node[key]):
                yield from leaves(node[key], f"{path}.")
            else:
                yield path, node[key]

    given = {key: value for key, value in leaves(schema) if value != "???"}
    assert not given, f"the schema gives values that belong in conf/: {given}"
    cfg = OmegaConf.to_container(compose_conf([], conf_dir=CONF))
    del cfg["train"]["lr"]
    with pytest.raises(ConfigError, match=r"no value for train\.lr"):
        from lmtune.config import validate

        validate(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=smoke"],
        ["experiment=sweep"],
        ["quant=qat_int4"],
        ["quant=int8", "quantize=gguf_q8_0"],
        ["quant=fp4", "model=llama2_7b", "model.path=x"],
        ["quant=none", "data=files", "data.files=[a.txt]"],
    ],
)
def test_dvc_and_make_params_compose_the_same_params(overrides):
    """`dvc exp run -S` composes conf/ with plain Hydra; `make params` merges into the schema. Any key
    only the schema fills in would differ between the two, so every experiment would miss DVC's
    run-cache and rerun every stage: conf/ must spell out every key."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        plain = OmegaConf.to_container(compose(config_name="config", overrides=overrides))
    assert plain == OmegaConf.to_container(compose_conf(overrides, conf_dir=CONF))


def test_the_committed_params_yaml_is_what_conf_composes():
    """`dvc repro` reads params.yaml as committed: it must be conf/'s composition, not an older one."""
    overrides, ours = read_header(ROOT / "params.yaml")
    assert ours, "params.yaml was edited by hand after `make params`"
    committed = OmegaConf.to_container(OmegaConf.load(ROOT / "params.yaml"))
    assert committed == OmegaConf.to_container(compose_conf(overrides, conf_dir=CONF), resolve=True), (
        "run `make params`"
    )


def test_the_config_comments_list_exactly_what_exists():
    """Option lists in conf/ comments are checked, not trusted: a group's list in conf/config.yaml
    names every file of the group, and a key's `a | b` list names only values the schema allows."""
    from lmtune.config import CHOICES
    from lmtune.tools.reference import CONF, entries, listed_options

    checked = 0
    for entry in entries(CONF / "config.yaml"):
        if entry.key.startswith("defaults.") and listed_options(entry.comment):
            group = entry.key.removeprefix("defaults.")
            files = {p.stem for p in (CONF / group).glob("*.yaml")} | (
                {"null"} if entry.value == "null" else set()
            )
            assert set(listed_options(entry.comment)) == files, (group, entry.comment)
            checked += 1
    assert checked == 7  # model, data, quantize, quant, align, rl, experiment
    for path in sorted(CONF.glob("*/*.yaml")):
        for entry in entries(path):
            if entry.key in CHOICES and (options := listed_options(entry.comment)):
                allowed = {"null" if v is None else str(v).lower() for v in CHOICES[entry.key]}
                assert set(options) <= allowed, (entry.file, entry.key, options)
                checked += 1
    assert checked > 15


def test_the_reference_page_holds_every_key_of_the_schema():
    from lmtune.tools.reference import markdown

    page = markdown()
    keys = [
        *flatten(compose_conf([], conf_dir=CONF)),
        *flatten(compose_conf(["model=tiny_random"], conf_dir=CONF)),
    ]
    missing = sorted({k for k in keys if f"`{k}`" not in page})
    assert len(keys) > 100 and not missing, missing


def test_each_option_list_of_the_code_is_the_schemas():
    from lmtune.config import CHOICES, QUANTIZE_METHODS
    from lmtune.data.sources import READERS
    from lmtune.export.quantize import METHODS

    assert set(READERS) == set(CHOICES["data.source"])
    assert METHODS is QUANTIZE_METHODS and set(CHOICES["quantize.method"]) == set(QUANTIZE_METHODS)
    assert {p.stem for p in (CONF / "quantize").glob("*.yaml")} == set(QUANTIZE_METHODS)


@pytest.mark.parametrize(
    "override, says",
    [
        ("lora.rank=8", "lora.rank: conf/ has no such key (did you mean lora.r?)"),
        ("train.momentum=0.9", "train.momentum: conf/ has no such key; see conf/config.yaml"),
        ("data.files=x.jsonl", "data.files is a list; write data.files=[x.jsonl]"),
    ],
)
def test_a_mistyped_override_gets_advice_that_fits_it(override, says):
    with pytest.raises(ConfigError) as refused:
        compose_conf(["experiment=smoke", override], conf_dir=CONF)
    assert says in str(refused.value) and "+" not in str(refused.value).split(":")[0]


def test_a_stage_override_of_a_group_or_an_unknown_key_says_where_it_belongs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        OmegaConf.to_yaml(compose_conf(["experiment=smoke"], conf_dir=CONF))
    )
    with pytest.raises(ConfigError, match=r"'model' is a config group; switch it when composing"):
        load(["model=llama2_7b"])
    with pytest.raises(ConfigError, match=r"has no key 'lora.rank'"):
        load(["lora.rank=8"])
    assert load(["lora.r=8", "data.files=[a.jsonl]"]).lora.r == 8


@pytest.mark.parametrize(
    ("last", "overrides", "refused"),
    [
        ("smoke", ["lora.r=5"], True),  # the profile dropped: DVC composed the full default
        ("smoke", ["experiment=smoke", "lora.r=5", "train.max_steps=100"], False),
        ("smoke", ["experiment=sweep", "lora.r=5"], False),  # another profile, chosen on purpose
        (None, ["lora.r=5"], False),  # the last run used the default
    ],
)
def test_dvc_exp_run_must_keep_the_profile_of_the_last_run(tmp_path, monkeypatch, last, overrides, refused):
    from lmtune.pipeline.params import check_profile_kept, record_profile

    record_profile([f"experiment={last}"] if last else [], root=tmp_path)
    cfg = compose_conf(overrides, conf_dir=CONF)
    params = tmp_path / "params.yaml"
    OmegaConf.save(cfg, params)  # as DVC writes it: no lmtune header
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    if refused:
        with pytest.raises(ConfigError, match=r"dvc exp run -S experiment=smoke -S lora.r=5\. To vary"):
            check_profile_kept(cfg, params, CONF)
    else:
        check_profile_kept(cfg, params, CONF)
    write_params(cfg, params, overrides, force=True)  # composed by lmtune: never questioned
    check_profile_kept(cfg, params, CONF)

"""Hydra configs: every option of every group composes and validates; bad keys and values fail clearly."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from specdec import registry
from specdec.bench import config
from specdec.bench.config import CONF_DIR, GROUPS, check_overrides, validate
from specdec.errors import ConfigError

# options that need a value the user must give
REQUIRED = {("target", "custom"): ["target.name=some/model"], ("drafter", "draft_model"): ["drafter.path=some/draft"]}
GROUP_OPTIONS = [(g, o) for g in GROUPS for o in config.group_options(g)]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides))


def test_every_group_has_options():
    assert {g for g, _ in GROUP_OPTIONS} == set(GROUPS)
    assert config.group_options("drafter") == ["draft_model", "eagle", "eagle3", "eagle_dynamic", "hybrid", "hybrid_all",
                                              "hybrid_suffix", "hybrid_traffic", "layerskip", "medusa", "medusa_dynamic",
                                              "ngram", "none", "recycling", "suffix"]


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = validate(compose_cfg(f"{group}={option}", *REQUIRED.get((group, option), [])))
    node = cfg[group]
    if group == "drafter":
        # file name = registry name, or a variant of one (eagle_dynamic: the eagle drafter with dynamic trees)
        assert node.name in registry.DRAFTERS and (node.name == option or option.startswith(node.name + "_"))
    else:  # a verifier's schema comes through the registry (its constructor's options)
        schema = registry.verifier_schema(option) if group == "verifier" else config.SECTIONS[group]
        assert OmegaConf.get_type(node).__name__ == schema.__name__
        assert set(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")) - {"defaults"} <= set(node)


def test_defaults_match_the_schemas():
    """The YAML defaults and the dataclass defaults say the same thing."""
    cfg = compose_cfg()
    for section, schema in [*config.SECTIONS.items(), *[("verifier", registry.verifier_schema(v))
                                                        for v in config.group_options("verifier")]]:
        node = cfg[section] if section != "verifier" else OmegaConf.load(CONF_DIR / "verifier" / f"{schema().name}.yaml")
        got = OmegaConf.to_container(node)
        want = {k: v for k, v in dataclasses.asdict(schema()).items() if v is not None}  # engine options: in the YAML
        assert {k: v for k, v in got.items() if k in want} == want, section
        assert set(got) == {f.name for f in dataclasses.fields(schema)}, section
    assert cfg.drafter.name == "ngram" and cfg.target.name is None


def test_demo_bench_overrides_default():
    cfg = compose_cfg("bench=demo")
    assert cfg.bench.limit == 8 and cfg.bench.max_new_tokens == 64 and cfg.bench.threads == 2


@pytest.mark.parametrize("name", config.group_options("drafter"))
def test_drafter_yaml_keys_are_constructor_options(name):
    node = config.load_drafter_config(name)
    params = inspect.signature(registry.drafter_class(node.name).__init__).parameters
    keys = set(config.drafter_kwargs(node))
    assert keys <= set(params), f"conf/drafter/{name}.yaml has keys its constructor lacks: {keys - set(params)}"


def test_drafter_kwargs_drop_name():
    assert config.drafter_kwargs(compose_cfg().drafter) == {"max_ngram": 3, "min_ngram": 2, "max_depth": 8,
                                                            "max_candidates": 8}


@pytest.mark.parametrize("args, fragment", [
    (["bench.bogus=1"], "unknown key 'bogus' in bench; valid keys: ['all_turns', 'batch_size', 'categories'"),
    (["target.nam=x"], "unknown key 'nam' in target; valid keys: ['declare_family', 'device', 'dtype', 'name', 'quantization']"),
    (["drafter.bogus=1"], "unknown key 'bogus' in drafter; valid keys: ['max_candidates', 'max_depth'"),
    (["drafter=none", "drafter.max_ngram=2"], "unknown key 'max_ngram' in drafter; valid keys: ['name']"),
    (["tree.nodes=4"], "unknown key 'nodes' in tree; valid keys: ['max_nodes']"),
    (["bogus=1"], "unknown key 'bogus' at the top level; valid keys: ['acceptance', 'bench', 'drafter'"),
])
def test_check_overrides_names_the_valid_keys(args, fragment):
    with pytest.raises(ConfigError) as e:
        check_overrides(args)
    assert fragment in str(e.value) and "Fix:" in str(e.value)


def test_check_overrides_accepts_good_and_leaves_the_rest_to_hydra():
    check_overrides(["bench.limit=2", "drafter=draft_model", "drafter.path=x", "tree=large", "target.name=m",
                     "hydra.run.dir=x", "--cfg", "job", "+bench.extra=1", "~bench.limit", "drafter=ngram,none",
                     "bench.categories=[a,b]", "drafter=bogus"])


@pytest.mark.parametrize("overrides, fragment", [
    (["+bench.bogus=1"], "unknown key 'bogus' in bench; valid keys:"),
    (["+target.bogus=1"], "unknown key 'bogus' in target"),
    (["+bogus=1"], "unknown key 'bogus' at the top level"),
    (["bench.max_new_tokens=abc"], "bad value for bench.max_new_tokens: Value 'abc'"),
    (["bench.all_turns=maybe"], "bad value for bench.all_turns"),
    (["bench.max_new_tokens=0"], "bench.max_new_tokens must be >= 1"),
    (["bench.limit=0"], "bench.limit null or >= 1"),
    (["tree.max_nodes=0"], "tree.max_nodes must be >= 1"),
    (["drafter.name=bogus"], "unknown drafter 'bogus'; choose one of ['draft_model', 'eagle', 'eagle3', 'hybrid', 'layerskip', 'medusa', 'ngram', 'none', 'recycling', 'suffix']"),
    (["verifier.name=bogus"], "unknown verifier 'bogus'; choose one of ['hf'"),
    (["acceptance.name=bogus"], "unknown acceptance rule 'bogus'"),
    (["drafter=draft_model"], "needs a draft model: set drafter.path="),
    (["target=custom"], "target=custom needs target.name="),
])
def test_validate_rejects_with_a_clear_message(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)  # one paragraph, not a dump


def test_validate_types_the_config():
    cfg = validate(compose_cfg("bench.limit=3", "bench.categories=[math]", "target.dtype=bfloat16"))
    assert OmegaConf.get_type(cfg.bench) is config.BenchConfig
    assert cfg.bench.limit == 3 and list(cfg.bench.categories) == ["math"] and cfg.target.dtype == "bfloat16"


def test_unknown_drafter_group_option_is_hydras_error():
    with pytest.raises(Exception, match="Could not find 'drafter/bogus'"):
        compose_cfg("drafter=bogus")


def test_load_drafter_config_unknown_names_the_options():
    with pytest.raises(ConfigError, match=r"no drafter config 'bogus'.*\['draft_model', 'eagle', 'eagle3', 'eagle_dynamic', 'hybrid'"):
        config.load_drafter_config("bogus")


def test_the_hybrid_drafters_default_parts_are_its_configs():
    """SpecDecoder(drafter="hybrid") from Python drafts as the bench's specdec:adaptive does (conf/drafter/hybrid.yaml)."""
    from drafters.hybrid import DEFAULT_PARTS

    assert OmegaConf.to_container(OmegaConf.load(CONF_DIR / "drafter" / "hybrid.yaml"))["drafters"] == list(DEFAULT_PARTS)

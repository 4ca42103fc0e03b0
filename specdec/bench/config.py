"""Config schemas for the Hydra entry points, and the checks that make a bad config fail early and clearly.

The YAML files under ``conf/`` stay thin; the dataclasses here say which keys exist and their types. Two checks
use them: :func:`check_overrides` looks at the command line before Hydra composes (so ``bench.bogus=1`` fails
naming the valid keys instead of with Hydra's "not in struct"), and :func:`validate` checks the composed config
(catching ``+bench.bogus=1``, wrong types, unknown names, a draft model without a path).

Drafter and verifier configs differ per choice, and their schemas come through the registry: a drafter's keys are
its constructor's options (see ``conf/drafter/*.yaml``; :func:`drafter_kwargs` hands them on and
:func:`specdec.registry.build_drafter` rejects unknown ones), a verifier's are :func:`specdec.registry.verifier_schema`.

>>> check_overrides(["bench.limit=2", "drafter=none"])
>>> check_overrides(["bench.bogus=1"])  # doctest: +ELLIPSIS
Traceback (most recent call last):
specdec.errors.ConfigError: unknown key 'bogus' in bench; valid keys: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specdec import registry
from specdec.algorithms.acceptance import RULES
from specdec.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("target", "drafter", "verifier", "acceptance", "tree", "bench")


@dataclass
class TargetConfig:
    """The model whose greedy output the bench reproduces."""

    name: Optional[str] = None  # None = the default target (SmolLM2-135M-Instruct); else a hub id or local path
    dtype: str = "float32"
    # int8 | int4 (GGUF Q8_0 / Q4_1 linears, 8-bit inputs) | bf16 (bfloat16 weights); a .gguf name: its own
    quantization: Optional[str] = None
    device: str = "cpu"
    declare_family: bool = False  # serve a model type outside the support matrix (to check it: see mismatches)


@dataclass
class AcceptanceConfig:
    name: str = "rejection"  # greedy | rejection (lossless; greedy when not sampling) | typical (LOSSY)


@dataclass
class TreeConfig:
    max_nodes: int = 16  # node budget per draft tree, root included


@dataclass
class BenchConfig:
    """Options of ``python -m specdec.bench``; ``conf/bench/default.yaml`` documents each one."""

    prompts: Optional[str] = None
    max_new_tokens: int = 128
    limit: Optional[int] = None
    categories: Optional[list[str]] = None
    all_turns: bool = False
    threads: int = 2
    methods: Optional[list[str]] = None
    output: str = "bench_results/bench.json"
    pld_tokens: int = 10
    warmup: int = 1
    chat: bool = True
    temperature: float = 0.0  # 0 = greedy; > 0 = sampled generation (HF sampling vs specdec's rejection rule)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 1  # > 1: batched requests (verifier=paged) against HF batched generate
    rounds: int = 1  # batch_size > 1: groups of prompts, every method runs a group before the next group
    plots: bool = False  # PNG plots next to the JSON (speedup per category and method, acceptance by depth)
    save_tokens: bool = False  # the requests' input ids and every method's outputs in the JSON (for a peer engine)
    peer_python: str = ".venv-vllm/bin/python"  # vLLM's environment, for the vllm methods (scripts/vllm_env.sh)
    peer_script: str = "scripts/peer_vllm.py"
    peer_log: Optional[str] = None  # where the vLLM child's stderr goes (null = discarded)
    quality: bool = True  # a target that is not plain float32: perplexity and top-1 agreement with float32
    llamacpp_dir: str = ".llamacpp"  # llama.cpp's llama-server and converter, for the llamacpp methods
    llamacpp_gguf: Optional[str] = None  # the target's GGUF: null = target.dtype's type; f32|bf16|f16|q8_0|q4_1|<file>
    llamacpp_draft: Optional[str] = None  # llamacpp:draft-simple's draft model: a .gguf file or an HF directory


@dataclass
class BenchAppConfig:
    """The composed config of ``conf/config.yaml``; ``drafter`` and ``verifier`` are open here (their keys depend
    on the choice) and checked against the registry's schemas by :func:`validate`."""

    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: dict[str, Any] = field(default_factory=lambda: {"name": registry.DEFAULT_DRAFTER})
    verifier: Any = field(default_factory=lambda: {"name": registry.REFERENCE_VERIFIER})
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


SECTIONS = {"target": TargetConfig, "acceptance": AcceptanceConfig, "tree": TreeConfig, "bench": BenchConfig}


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``, e.g. ``["draft_model", "ngram", "none"]``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def drafter_file_keys(name: str) -> list[str] | None:
    """The keys of ``conf/drafter/<name>.yaml`` (None when there is no such file)."""
    path = CONF_DIR / "drafter" / f"{name}.yaml"
    return list(OmegaConf.load(path).keys()) if path.exists() else None


def load_drafter_config(name: str) -> DictConfig:
    """``conf/drafter/<name>.yaml`` as a config node, for a bench method ``specdec:<name>``."""
    path = CONF_DIR / "drafter" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no drafter config {name!r} (no {path}); choose one of {group_options('drafter')}.")
    return OmegaConf.load(path)


def drafter_kwargs(node) -> dict[str, Any]:
    """A drafter config node as constructor options: every key but ``name``."""
    opts = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return {k: v for k, v in opts.items() if k != "name"}


def isolate_caches(drafter: str, kwargs: dict[str, Any], method: str) -> dict[str, Any]:
    """A drafter's options with its suffix-decoding cache or recycling table (its own, or a hybrid part's) named
    after the bench ``method``: the bench runs methods side by side on the same prompts, and a cache two methods
    shared would hand one method's answer to the other as a draft."""
    name = f"bench:{method}"
    key = {"suffix": "cache", "recycling": "table"}
    if drafter in key:
        return {**kwargs, key[drafter]: name}
    if drafter == "hybrid" and kwargs.get("drafters"):
        return {**kwargs, "drafters": [{**p, key[p["name"]]: name} if isinstance(p, dict) and p.get("name") in key
                                       else p for p in kwargs["drafters"]]}
    return kwargs


def verifier_kwargs(node) -> dict[str, Any]:
    """A verifier config node as :class:`specdec.SpecDecoder` ``verifier_kwargs``: every set key but ``name``."""
    opts = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return {k: v for k, v in opts.items() if k != "name" and v is not None}


def load_verifier_config(name: str) -> DictConfig:
    """``conf/verifier/<name>.yaml``, for a bench method ``specdec:<drafter>@<name>``."""
    path = CONF_DIR / "verifier" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no verifier config {name!r} (no {path}); choose one of {group_options('verifier')}.")
    return check_verifier(OmegaConf.load(path))


def _unknown_key(section: str, key: str, valid: list[str]) -> ConfigError:
    where = f"in {section}" if section else "at the top level"
    fix = (f"check the spelling, or pick another {section} with {section}=<option> ({group_options(section)})"
           if section in GROUPS else "top-level keys are the config groups; set a key inside one, e.g. bench.limit=2")
    return ConfigError(f"unknown key {key!r} {where}; valid keys: {sorted(valid)}. Fix: {fix}.")


def _default_choice(group: str) -> str | None:
    """The option ``conf/config.yaml``'s defaults list picks for ``group``."""
    for item in OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []):
        if OmegaConf.is_dict(item) and group in item:
            return str(item[group])
    return None


def _valid_keys(section: str, choices: dict[str, str | None]) -> list[str] | None:
    """Valid keys of one section (None: cannot tell, e.g. a swept or unknown group choice). ``choices``: the
    chosen option of the ``drafter`` and ``verifier`` groups."""
    if section in SECTIONS:
        return [f.name for f in fields(SECTIONS[section])]
    if section == "drafter":
        name = choices.get("drafter")
        return drafter_file_keys(name) if isinstance(name, str) else None
    if section == "verifier":
        name = choices.get("verifier")
        if not isinstance(name, str) or name not in registry.VERIFIERS:
            return None
        return [f.name for f in fields(registry.verifier_schema(name))]
    raise _unknown_key("", section, list(GROUPS))


def check_overrides(args: list[str]) -> None:
    """Fail on a command-line ``key=value`` whose key no schema has, before Hydra composes.

    Only plain overrides are checked (``+key``/``++key``/``~key``, ``hydra.*`` and flags are left to Hydra and
    :func:`validate`); group choices such as ``drafter=bogus`` are left to Hydra, whose message lists the options.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed.append(parser.parse_override(arg))
        except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report, with its own message
            continue
    plain = [o for o in parsed if not (o.is_hydra_override() or o.is_add() or o.is_force_add() or o.is_delete())]
    chosen = {o.key_or_group: o.value() for o in plain if o.key_or_group in GROUPS}
    choices = {g: chosen.get(g, _default_choice(g)) for g in ("drafter", "verifier")}
    for o in plain:
        section, _, key = o.key_or_group.partition(".")
        if not key:
            if section not in GROUPS:
                raise _unknown_key("", section, list(GROUPS))
            continue
        valid = _valid_keys(section, choices)
        if valid is not None and key.split(".")[0] not in valid:
            raise _unknown_key(section, key.split(".")[0], valid)


def validate(cfg: DictConfig) -> DictConfig:
    """The composed bench config checked against :class:`BenchAppConfig` and the chosen verifier's schema (keys,
    types, names); returns it typed."""
    for section in [k for k in cfg if k not in ("hydra", "drafter", "verifier")]:
        valid = _valid_keys(section, {})
        for key in cfg[section]:
            if key not in valid:
                raise _unknown_key(section, key, valid)
    if "drafter" in cfg:
        check_drafter(cfg.drafter)
    if "target" in cfg and OmegaConf.is_missing(cfg.target, "name"):
        raise ConfigError("target=custom needs target.name=<hub id or local checkpoint directory>.")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(BenchAppConfig), cfg)
        if "verifier" in cfg:
            typed.verifier = check_verifier(cfg.verifier)
    except OmegaConfBaseException as e:
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"bad value for {e.full_key}: {msg}. Fix that override (see conf/ for examples).") from None
    _check_names(typed)
    return typed


def check_drafter(node) -> None:
    """A drafter config names a registered drafter and sets the options it requires (e.g. ``draft_model`` a
    ``path``)."""
    registry.check_drafter_config(node.get("name"), node)


def check_verifier(node) -> DictConfig:
    """A verifier config checked against its registered schema (unknown keys, types); returns it typed."""
    name = node.get("name")
    if name not in registry.VERIFIERS:
        raise ConfigError(f"unknown verifier {name!r}; choose one of {sorted(registry.VERIFIERS)}.")
    schema = registry.verifier_schema(name)
    valid = [f.name for f in fields(schema)]
    for key in node:
        if key not in valid:
            raise _unknown_key("verifier", key, valid)
    return OmegaConf.merge(OmegaConf.structured(schema), node)


def _check_names(cfg: DictConfig) -> None:
    if cfg.acceptance.name not in RULES:
        raise ConfigError(f"unknown acceptance rule {cfg.acceptance.name!r}; choose one of {sorted(RULES)}.")
    if cfg.tree.max_nodes < 1:
        raise ConfigError(f"tree.max_nodes must be >= 1 (the root); got {cfg.tree.max_nodes}.")
    b = cfg.bench
    for key in ("max_new_tokens", "threads", "pld_tokens"):
        if b[key] < 1:
            raise ConfigError(f"bench.{key} must be >= 1; got {b[key]}.")
    if b.batch_size < 1:
        raise ConfigError(f"bench.batch_size must be >= 1; got {b.batch_size}.")
    if b.rounds < 1:
        raise ConfigError(f"bench.rounds must be >= 1; got {b.rounds}.")
    if b.warmup < 0 or (b.limit is not None and b.limit < 1):
        raise ConfigError("bench.warmup must be >= 0 and bench.limit null or >= 1.")
    if b.temperature < 0:
        raise ConfigError(f"bench.temperature must be >= 0 (0 = greedy); got {b.temperature}.")
    if b.temperature > 0 and cfg.acceptance.name == "greedy":
        raise ConfigError("acceptance=greedy keeps only argmax tokens; with bench.temperature > 0 use "
                          "acceptance=rejection (lossless) or acceptance=typical (lossy).")

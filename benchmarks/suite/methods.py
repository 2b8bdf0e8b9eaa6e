"""The methods the suite compares: store presets and baseline selectors, each with its budget.

    m = make_method("pqcache", budget="0.1")   # -> Method(name, budget, definition, config)
    available_methods()                          # {name: None or why it cannot run yet}

Every method runs through the same path: `KVStoreClient(method.config).attach(model)`. A method
the store cannot build (a one-layer store on the CPU refuses it) raises `MethodUnavailable` with
the store's reason.

Budgets (`--budgets`), for the methods that select tokens at decode:
  * a fraction c in (0, 1] ("0.2"): PQCache's definition, per (sequence, layer, KV head):
    S sink tokens + window int((n - S) * c * r) + top-k int((n - S) * c * (1 - r)), n the prompt
    length, r the window share (0.5), S = 32: about c of the prompt is attended;
  * an integer k > 1 ("512"): S sinks + the same derived window + exactly k selected tokens.
Methods without a token budget (full, quant, leankv) run once, with budget "all" (full, quant)
or their thresholds (leankv); `--budgets` does not apply to them. Every result row carries
`budget_definition`, the sentence that says which definition produced it.

Options: "name@field=value[:field=value]" runs a method with KVStoreConfig fields overridden,
e.g. "leankv@alpha_p=0.002" (LeanKV's thresholds are model-specific: the preset's are the
paper's for Llama-3-8B) or "tiered@alpha_p=0.005"; aliases alpha_p / alpha_q stand for
alpha_prune / alpha_quant. The options become part of the method's label, so the variants are
separate columns (and resume separately).

Method lists: "available" (or "all") stands for every method the store provides now; those it
does not provide are skipped with a logged warning, while a method named explicitly that the
store cannot run raises `MethodUnavailable`. Availability is checked by building a one-layer
store on the CPU (the store refuses some combinations at construction, e.g. a selector that is
not in its registry, `kvstore/cold/selectors.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from kvstore.config import KVStoreConfig

logger = logging.getLogger(__name__)

#: Every method the suite knows, in report order.
METHODS = ("full", "quant", "leankv", "streaming", "h2o", "snapkv", "quest", "pqcache", "oracle", "tiered")
#: Methods that take a token budget (the rest ignore --budgets).
BUDGETED = ("streaming", "h2o", "snapkv", "quest", "pqcache", "oracle", "tiered")
#: The selectors of the baselines (KVStoreConfig.selector), run with sinks + window in the hot
#: tier and every token in the cold tier, exactly like pqcache/oracle but for the scoring.
BASELINE_SELECTORS = {"streaming": "streaming", "h2o": "h2o", "snapkv": "snapkv", "quest": "quest"}
DEFAULT_BUDGET = "0.2"
#: What `kvstore-bench quick` compares by default: full against the best presets and one baseline.
QUICK_METHODS = ("full", "quant", "leankv", "snapkv", "pqcache", "oracle", "tiered")
#: Names in a method list that stand for every available method.
ALL_AVAILABLE = ("available", "all")

_SELECTION = {
    "streaming": "StreamingLLM: the most recent candidates (a longer window)",
    # H2O's accumulated attention is recomputed every step from the full keys of every token,
    # kept on the GPU (ExactSelector) with an fp32 accumulator: its GPU KV bytes are about dense
    # (0.8-0.9x compression). This baseline measures H2O's selection, not its memory saving.
    "h2o": "H2O: largest accumulated attention, scored from full keys of every token kept on the GPU "
           "(+ fp32 accumulators: GPU KV about dense size, no memory saving by design)",
    "snapkv": "SnapKV: observation-window votes at prefill (fixed)",
    "quest": "Quest: top pages by the min/max key bound",
    "pqcache": "PQ top-k from the cold tier (PQCache)",
    "oracle": "exact top-k over full keys (oracle; the full keys stay on the GPU: no memory saving)",
    "tiered": "PQ top-k over the tokens the LeanKV hot tier pruned",
}


class MethodUnavailable(RuntimeError):
    """The store does not provide this method yet (the message says what is missing)."""


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a name, a budget label, what it means, and the config."""

    name: str
    budget: str
    budget_definition: str
    config: KVStoreConfig

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.budget)


def parse_budget(budget: str) -> tuple[str, float | int]:
    """("fraction", c) or ("tokens", k) for a --budgets entry; ValueError otherwise."""
    text = str(budget).strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"budget {budget!r} must be a fraction in (0, 1] or a token count > 1") from None
    if 0 < value <= 1 and ("." in text or value < 1):
        return "fraction", value
    if value > 1 and value == int(value):
        return "tokens", int(value)
    if value == 1:
        return "fraction", 1.0
    raise ValueError(f"budget {budget!r} must be a fraction in (0, 1] or a token count > 1")


def _preset(name: str, **overrides) -> KVStoreConfig:
    try:
        return KVStoreConfig.preset(name, **overrides)
    except NotImplementedError as exc:
        raise MethodUnavailable(str(exc)) from None


def check_store(config: KVStoreConfig) -> None:
    """Build a one-layer store on the CPU with `config`; MethodUnavailable if the store refuses it.

    Catches a combination the store raises NotImplementedError for at construction (a selector
    or policy not in its registries). Costs milliseconds (the first retrieval store
    imports FAISS).
    """
    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    geometry = ModelGeometry(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=16, dtype=torch.float32,
                             device=torch.device("cpu"))
    # the caps are judged against the real model when its store is built (the minimum depends on it)
    probe = dataclasses.replace(config, max_batch_size=1, hot_tier_bytes=None, host_tier_bytes=None)
    try:
        store = KVStore(probe, geometry)
    except NotImplementedError as exc:
        raise MethodUnavailable(f"preset {config.name!r}: {exc}") from None
    store.release_all()


def _selection_config(name: str, budget: str, options: dict | None = None) -> tuple[KVStoreConfig, str, str]:
    kind, value = parse_budget(budget)
    if name in BASELINE_SELECTORS:
        base = dict(hot_policy="window", selector=BASELINE_SELECTORS[name], cold_tier=True)
        if name not in KVStoreConfig._PRESETS:
            try:
                config = KVStoreConfig(name=name, **base)
            except ValueError as exc:
                raise MethodUnavailable(f"{name}: {exc}") from None
            config = config.replace(**(options or {}))
        else:
            config = _preset(name, **(options or {}))
    else:
        config = _preset(name, **(options or {}))
    if kind == "fraction":
        config = dataclasses.replace(config, budget_fraction=float(value), token_budget=None)
        label = f"c={value:g}"
        topk = f"top-k int((n-S)*{value:g}*(1-r))"
    else:
        config = dataclasses.replace(config, token_budget=int(value))
        label = f"k={value}"
        topk = f"top-k {value}"
    S, c, r = config.sink_tokens, config.budget_fraction, config.window_share
    window = f"window {config.window_tokens}" if config.window_tokens is not None else f"window int((n-S)*{c:g}*{r:g})"
    hot = (f"LeanKV hot tier (prune below {config.alpha_prune:g}/n, K{config.low_key_bits}V{config.low_value_bits} below "
           f"{config.alpha_quant:g}/n, else K{config.key_bits}V{config.value_bits}) + " if config.hot_policy == "leankv" else "")
    definition = (
        f"per (sequence, layer, KV head) at decode: {hot}S={S} sinks + {window} + {topk} "
        f"[{_SELECTION[name]}]; n = prompt tokens, r = window share"
    )
    return config, label, definition


#: Short names accepted in method options ("leankv@alpha_p=0.002").
OPTION_ALIASES = {"alpha_p": "alpha_prune", "alpha_q": "alpha_quant"}


def parse_method(spec: str) -> tuple[str, dict]:
    """("leankv", {"alpha_prune": 0.002}) for "leankv@alpha_p=0.002"; ValueError naming the bad part.

    Values are parsed as the field's current type (int, float, bool, str; "none" for None).
    """
    name, _, options = str(spec).strip().partition("@")
    if not options:
        return name, {}
    fields = {f.name for f in dataclasses.fields(KVStoreConfig)}
    defaults = KVStoreConfig()
    out = {}
    for part in options.split(":"):
        key, eq, text = part.partition("=")
        key = OPTION_ALIASES.get(key.strip(), key.strip())
        if key in ("budget_fraction", "token_budget"):
            raise ValueError(f"method {spec!r}: set the budget with --budgets, not {key}")
        if not eq or key not in fields or key == "name":
            raise ValueError(f"method {spec!r}: option {part!r} must be field=value with a KVStoreConfig field "
                             f"(or {', '.join(OPTION_ALIASES)})")
        out[key] = _parse_value(spec, key, text.strip(), getattr(defaults, key))
    return name, out


def _parse_value(spec: str, key: str, text: str, default):
    if text.lower() == "none":
        return None
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or default is None:
            number = float(text)
            return int(number) if default is None and number == int(number) and "." not in text else number
    except ValueError:
        kind = "number" if default is None else type(default).__name__
        raise ValueError(f"method {spec!r}: {key}={text!r} is not a {kind}") from None
    return text


def _options_text(options: dict) -> str:
    short = {v: k for k, v in OPTION_ALIASES.items()}
    return ":".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
                    for k, v in options.items())


def _leankv_text(config: KVStoreConfig) -> tuple[str, str]:
    return (
        f"alpha_p={config.alpha_prune:g}",
        f"per-head dynamic: prune below {config.alpha_prune:g}/n, K{config.low_key_bits}V{config.low_value_bits} "
        f"below {config.alpha_quant:g}/n, else K{config.key_bits}V{config.value_bits}; last "
        f"{config.immune_tokens} tokens immune (pruned tokens are gone)",
    )


def _make_method(name: str, budget: str | None = None, options: dict | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    extra = _options_text(options) if options else ""
    if name == "leankv":
        config = _preset("leankv", **(options or {}))
        label, definition = _leankv_text(config)
        return Method("leankv", label if set(options or {}) <= {"alpha_prune"} else extra, definition, config)
    if name in ("full", "quant"):
        config = _preset(name, **(options or {}))
        definition = ("every token at the model's dtype (exact)" if name == "full" else
                      f"every token, K{config.key_bits}V{config.value_bits} per-token quantization")
        return Method(name, extra or "all", definition + (f" (with {extra})" if extra else ""), config)
    config, label, definition = _selection_config(name, budget or DEFAULT_BUDGET, options)
    return Method(name, f"{label}:{extra}" if extra else label, definition + (f" (with {extra})" if extra else ""), config)


def make_method(name: str, budget: str | None = None) -> Method:
    """Build method `name` (options allowed: "leankv@alpha_p=0.002") at `budget` (see the module
    docstring); MethodUnavailable if not built, ValueError for a bad name or option."""
    base, options = parse_method(name)
    method = _make_method(base, budget, options)
    check_store(method.config)
    return method


def expand_methods(names: list[str], budgets: list[str] | None = None, skip_unavailable: bool = False) -> list[Method]:
    """Methods x budgets (budgets only multiply the budgeted methods).

    "available" / "all" in `names` expands to every method in METHODS. A method the store
    cannot run raises MethodUnavailable, unless it came from "available" or `skip_unavailable`
    is set: then it is left out with a logged warning.
    """
    budgets = budgets or [DEFAULT_BUDGET]
    for b in budgets:
        parse_budget(b)  # ValueError naming the bad entry before anything runs
    expanded: list[tuple[str, bool]] = []  # (name, may skip)
    for name in names:
        if name in ALL_AVAILABLE:
            expanded += [(m, True) for m in METHODS]
        elif parse_method(name)[0] not in METHODS:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)} (or 'available')")
        else:
            expanded.append((name, skip_unavailable))
    out: list[Method] = []
    seen: set[tuple[str, str]] = set()
    for name, may_skip in expanded:
        for budget in budgets if parse_method(name)[0] in BUDGETED else [None]:
            try:
                method = make_method(name, budget)
            except MethodUnavailable as exc:
                if not may_skip:
                    raise
                logger.warning("method %s skipped: %s", name, exc)
                break
            if method.key not in seen:
                seen.add(method.key)
                out.append(method)
    return out


def available_methods() -> dict[str, str | None]:
    """{method: None when it runs, else the reason it cannot run yet}."""
    out = {}
    for name in METHODS:
        try:
            make_method(name)
            out[name] = None
        except MethodUnavailable as exc:
            out[name] = str(exc)
    return out

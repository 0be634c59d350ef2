"""W&B sweep parameters as an Optuna search space, sampler and pruner (the offline sweep engine).

A sweep file keeps W&B's format (``wsi_lightning/sweep.py``); the offline agent translates it here:

============================================  =================================================
W&B parameter spec                            Optuna distribution
============================================  =================================================
``value: v`` (``constant``)                   ``CategoricalDistribution([v])``
``values: [...]`` (``categorical``)           ``CategoricalDistribution([...])``
``int_uniform`` (or integer ``min``/``max``)  ``IntDistribution(min, max)``
``uniform`` (or float ``min``/``max``)        ``FloatDistribution(min, max)``
``q_uniform``                                 ``IntDistribution`` / ``FloatDistribution`` with
                                              ``step=q`` (``Int`` when ``q``, min, max are ints)
``log_uniform_values``                        ``FloatDistribution(min, max, log=True)``
``inv_log_uniform_values``                    ``FloatDistribution(min, max, log=True)``
``log_uniform`` (bounds are exponents)        ``FloatDistribution(e^min, e^max, log=True)``
``inv_log_uniform`` (bounds are exponents)    ``FloatDistribution(e^-max, e^-min, log=True)``
``q_log_uniform_values`` with ``q: 1``        ``IntDistribution(min, max, log=True)``
============================================  =================================================

``method: grid`` -> ``GridSampler`` (the grid of each parameter: its values; ``int_uniform`` and
``q_uniform`` enumerated), ``random`` -> ``RandomSampler``, ``bayes`` -> ``TPESampler``.
``early_terminate: {type: hyperband, min_iter, eta}`` -> ``SuccessiveHalvingPruner(min_resource=
min_iter, reduction_factor=eta)``: W&B's hyperband with ``min_iter`` is one bracket of rungs at
validation epoch index ``min_iter * eta^k`` (the 0-based history index W&B calls a band), which
is asynchronous successive halving; Optuna's ``HyperbandPruner`` would add brackets W&B does
not have.

Deviations from W&B:
    - ``normal``, ``log_normal``, ``beta`` (and their ``q_`` forms), ``values`` with
      ``probabilities``, and ``q_log_uniform[_values]`` with ``q`` other than 1 have no Optuna
      distribution; a file using them is refused (offline and online search the same space).
    - ``inv_log_uniform[_values]``: W&B draws ``1/X``; the values have the same log-uniform law,
      so the same Optuna distribution is used.
    - ``q_uniform`` takes the values ``min + k*q`` up to ``max`` (``max - min`` must be a multiple
      of ``q``); W&B rounds a uniform draw to a multiple of ``q`` (the same values when ``min``
      is a multiple of ``q``, with half weight at the ends) and its grid leaves out ``max``.
    - Hyperband: ``max_iter``/``s`` is refused (write the first band as ``min_iter``); ``eta``
      must be an integer >= 2. Optuna keeps a trial at a band when it is in the top
      ``n // eta`` (at least 1) of the ``n`` trials that reached it; W&B keeps it when it is no
      worse than the ``int(n / eta)``-th best, one more. The value compared is the trial's best
      so far (W&B compares that against the other trials' values at the band).
    - Values that are lists or mappings are JSON strings inside Optuna (its categorical
      choices are scalars); the trial gets them decoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from wsi_lightning.errors import ConfigError

METHODS = ("grid", "random", "bayes")
# distribution -> the keys it takes besides `distribution` (W&B's schema: no others allowed)
KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("value",), "categorical": ("values",), "int_uniform": ("min", "max"),
    "uniform": ("min", "max"), "q_uniform": ("min", "max", "q"),
    "log_uniform_values": ("min", "max"), "inv_log_uniform_values": ("min", "max"),
    "log_uniform": ("min", "max"), "inv_log_uniform": ("min", "max"),
    "q_log_uniform_values": ("min", "max", "q"),
}
UNSUPPORTED = ("normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta", "q_log_uniform")
SCALAR = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class SearchSpace:
    """The Optuna distributions of a sweep's parameters (dotted config keys).

    ``encoded``: parameters whose choices are JSON strings inside Optuna (list or dict values).
    """

    distributions: dict[str, BaseDistribution]
    encoded: frozenset[str] = frozenset()

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's values (``trial.params``) -> the values a trial's config gets."""
        return {k: json.loads(v) if k in self.encoded else v for k, v in params.items()}

    def grid(self, where: str) -> dict[str, list[Any]]:
        """Every parameter's values for ``GridSampler``; a continuous parameter is refused."""
        out: dict[str, list[Any]] = {}
        for k, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                out[k] = list(d.choices)
            elif isinstance(d, IntDistribution) and not d.log:
                out[k] = list(range(d.low, d.high + 1, d.step))
            elif isinstance(d, FloatDistribution) and d.step is not None:
                n = round((d.high - d.low) / d.step)
                out[k] = [round(d.low + i * d.step, 12) for i in range(n + 1)]
            else:
                raise ConfigError(f"{where}: method grid needs values, int_uniform or q_uniform "
                                  f"parameters; parameters.{k} is continuous ({d})")
        return out

    def grid_size(self, where: str) -> int:
        return math.prod(len(v) for v in self.grid(where).values())

    def example(self) -> dict[str, Any]:
        """One value of every parameter (the first choice, the lower bound): a dry run's."""
        out = {}
        for k, d in self.distributions.items():
            out[k] = d.choices[0] if isinstance(d, CategoricalDistribution) else d.low
        return self.decode(out)


def search_space(parameters: dict[str, Any], where: str) -> SearchSpace:
    """The Optuna counterpart of a sweep's ``parameters`` (see the module docstring).

    Args:
        parameters: ``{dotted config key: W&B parameter spec}``.
        where: names the sweep file in error messages.
    """
    dists, encoded = {}, set()
    for key, spec in parameters.items():
        dists[key], enc = _distribution(spec, f"{where}: parameters.{key}")
        if enc:
            encoded.add(key)
    return SearchSpace(dists, frozenset(encoded))


def _kind(spec: dict[str, Any], where: str) -> str:
    """W&B's distribution name, inferred as W&B does when the spec has none."""
    if "distribution" in spec:
        return spec["distribution"]
    if "values" in spec:
        return "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    if "value" in spec:
        return "constant"
    lo, hi = spec.get("min"), spec.get("max")
    if lo is None or hi is None:
        raise ConfigError(f"{where}: {spec!r} is not a W&B parameter spec; expected value, values, "
                          "or min/max (with a distribution, e.g. log_uniform_values)")
    return "int_uniform" if type(lo) is int and type(hi) is int else "uniform"


def _distribution(spec: dict[str, Any], where: str) -> tuple[BaseDistribution, bool]:
    kind = _kind(spec, where)
    if kind in UNSUPPORTED or kind == "categorical_w_probabilities":
        raise ConfigError(f"{where}: {kind} has no Optuna distribution (the offline engine); "
                          f"use one of {sorted(KEYS)}")
    if kind not in KEYS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; expected one of {sorted(KEYS)}")
    extra = sorted(set(spec) - {"distribution", *KEYS[kind]})
    missing = sorted(k for k in KEYS[kind] if k not in spec and k != "q")
    if extra or missing:
        raise ConfigError(f"{where}: {kind} takes {list(KEYS[kind])}; "
                          + (f"unexpected {extra}" if extra else f"missing {missing}"))
    if kind in ("constant", "categorical"):
        choices = [spec["value"]] if kind == "constant" else list(spec["values"])
        if not choices:
            raise ConfigError(f"{where}: values is empty")
        if all(isinstance(c, SCALAR) for c in choices):
            return CategoricalDistribution(choices), False
        return CategoricalDistribution([json.dumps(c) for c in choices]), True
    lo, hi, q = spec["min"], spec["max"], spec.get("q", 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi, q)):
        raise ConfigError(f"{where}: min, max (and q) must be numbers; got {spec!r}")
    if not lo < hi:
        raise ConfigError(f"{where}: min {lo} is not less than max {hi}")
    if kind == "int_uniform":
        if type(lo) is not int or type(hi) is not int:
            raise ConfigError(f"{where}: int_uniform needs integer min and max; got {lo}, {hi}")
        return IntDistribution(lo, hi), False
    if kind == "uniform":
        return FloatDistribution(float(lo), float(hi)), False
    if kind == "q_uniform":
        return _stepped(lo, hi, q, where), False
    if kind in ("log_uniform", "inv_log_uniform"):  # bounds are natural-log exponents
        lo, hi = (math.exp(lo), math.exp(hi)) if kind == "log_uniform" else (math.exp(-hi), math.exp(-lo))
        return FloatDistribution(lo, hi, log=True), False
    if lo <= 0:
        raise ConfigError(f"{where}: {kind} needs min > 0; got {lo}")
    if kind == "q_log_uniform_values":
        if not (q == 1 and type(lo) is int and type(hi) is int):
            raise ConfigError(f"{where}: q_log_uniform_values is supported with q: 1 and integer "
                              f"bounds only (Optuna's log-scale integers); got {spec!r}")
        return IntDistribution(lo, hi, log=True), False
    return FloatDistribution(float(lo), float(hi), log=True), False


def _stepped(lo: float, hi: float, q: float, where: str) -> BaseDistribution:
    n = (hi - lo) / q
    if q <= 0 or abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
        raise ConfigError(f"{where}: q_uniform needs max - min ({hi} - {lo}) to be a positive "
                          f"multiple of q ({q})")
    if all(type(v) is int for v in (lo, hi, q)):
        return IntDistribution(lo, hi, step=q)
    return FloatDistribution(float(lo), float(hi), step=float(q))


def trial_seed(seed: int, slot: int) -> int:
    """The proposal seed of trial ``slot`` of a sweep seeded ``seed``: proposals depend on
    (seed, slot, the trials finished before), never on which worker asks or on training's RNG."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(slot)]).generate_state(1)[0])


class _GridSampler(optuna.samplers.GridSampler):
    """``GridSampler`` that leaves stopping to the agent: it checks ``is_exhausted`` before it
    asks, while Optuna's ``after_trial`` calls ``study.stop()``, which only an
    ``optimize`` loop may call (the agent asks and tells)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(method: str, space: SearchSpace, seed: int, slot: int,
                 where: str = "sweep") -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial ``slot``.

    A grid keeps one order per sweep (``seed``); random and bayes draw with ``trial_seed``.
    """
    if method == "grid":
        return _GridSampler(space.grid(where), seed=int(seed) % 2**32)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed(seed, slot))
    if method == "bayes":
        return optuna.samplers.TPESampler(seed=trial_seed(seed, slot))
    raise ConfigError(f"{where}: key 'method' = {method!r}; expected one of {list(METHODS)}")


def make_pruner(early_terminate: dict[str, Any] | None, where: str) -> optuna.pruners.BasePruner:
    """``early_terminate`` -> the study's pruner (see the module docstring); none: never prune."""
    if early_terminate is None:
        return optuna.pruners.NopPruner()
    et = early_terminate
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise ConfigError(f"{where}: key 'early_terminate' = {et!r}; expected {{type: hyperband, "
                          "min_iter: <validation epochs>, eta: <int>}")
    if "max_iter" in et or "s" in et:
        raise ConfigError(f"{where}: early_terminate with max_iter/s is not supported offline; give "
                          "the first band as min_iter (bands at min_iter * eta^k)")
    extra = sorted(set(et) - {"type", "min_iter", "eta"})
    min_iter, eta = et.get("min_iter"), et.get("eta", 3)
    if extra or type(min_iter) is not int or min_iter < 1 or type(eta) is not int or eta < 2:
        raise ConfigError(f"{where}: early_terminate = {et!r}; expected min_iter: an integer >= 1, "
                          "eta: an integer >= 2 (default 3), and no other keys")
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_iter, reduction_factor=eta,
                                                  min_early_stopping_rate=0)

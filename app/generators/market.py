"""Market feed: N instruments quoted every interval on a venue that trades around the clock.

Per instrument, one record per interval with ``price`` (last trade), ``volume`` (shares in the
interval) and ``spread_bps`` (quoted bid-ask spread in basis points of the mid).

- Prices follow geometric Brownian motion whose volatility switches between a calm and a
  volatile regime (a two-state Markov chain; volatile spells are rarer and shorter).
- Volumes have intraday seasonality: a U over the trading day (heavy at the open and the
  close, light at midday; the trading day is the UTC day) with log-normal noise, heavier in the
  volatile regime.
- Spreads widen in the volatile regime and slightly at the open and close.

Injected anomalies: ``price_jump`` (a persistent 3–6 % level shift of the price),
``volume_burst`` (volume ×5–10 for 2–6 intervals), ``spread_blowout`` (spread ×6–12 for 3–10
intervals) and ``stale_price`` (the price stays exactly flat for 20–60 intervals while the
market moves on). The last quarter of the instruments (at least one of two or more) carries no
anomaly at all.
"""

from __future__ import annotations

import math

import numpy as np

from app.generators.common import (
    Feed,
    FeedSpec,
    Label,
    Series,
    anomaly_count,
    clean_count,
    daily_phase,
    lognormal_noise,
    place_windows,
    series_rng,
    u_shape,
)

DEFAULT_INSTRUMENTS = 6
TICKERS = (
    "ACME", "BOLT", "CRUX", "DYNA", "EMBR", "FLUX", "GRID", "HALO", "IONX", "JADE",
    "KILN", "LUMA", "MIRA", "NOVA", "ORBT", "PYRE", "QUIL", "RUNE", "SOLA", "TERA",
)  # fmt: skip

SECONDS_PER_YEAR = 365.0 * 86400.0
CALM_VOLATILITY = 0.25  # annualised
VOLATILE_VOLATILITY = 0.80
# Per-step switching probabilities are scaled to the interval, so regimes last the same
# wall-clock time whatever the sampling: calm spells ~12 h, volatile spells ~2 h on average.
CALM_MEAN_SECONDS = 12 * 3600.0
VOLATILE_MEAN_SECONDS = 2 * 3600.0

KINDS = ("price_jump", "volume_burst", "spread_blowout", "stale_price")


def instrument_name(index: int) -> str:
    base = TICKERS[index % len(TICKERS)]
    return base if index < len(TICKERS) else f"{base}{index // len(TICKERS)}"


def regimes(rng: np.random.Generator, spec: FeedSpec) -> np.ndarray:
    """0 (calm) or 1 (volatile) per point."""
    to_volatile = min(1.0, spec.interval / CALM_MEAN_SECONDS)
    to_calm = min(1.0, spec.interval / VOLATILE_MEAN_SECONDS)
    draws = rng.random(spec.points)
    state = np.zeros(spec.points, dtype=np.int8)
    current = 0
    for index in range(spec.points):
        if current == 0 and draws[index] < to_volatile:
            current = 1
        elif current == 1 and draws[index] < to_calm:
            current = 0
        state[index] = current
    return state


def generate(spec: FeedSpec) -> Feed:
    count = spec.entities or DEFAULT_INSTRUMENTS
    clean_from = count - clean_count(count)
    phase = daily_phase(spec)
    series: list[Series] = []
    labels: list[Label] = []
    for index in range(count):
        name = instrument_name(index)
        rng = series_rng(spec.seed, "market", name)
        dims = {"instrument": name}
        regime = regimes(rng, spec)
        sigma = np.where(regime == 1, VOLATILE_VOLATILITY, CALM_VOLATILITY)
        dt = spec.interval / SECONDS_PER_YEAR
        log_steps = -0.5 * sigma**2 * dt + sigma * math.sqrt(dt) * rng.standard_normal(spec.points)
        log_steps[0] = 0.0
        price = float(rng.uniform(20.0, 400.0)) * np.exp(np.cumsum(log_steps))

        base_volume = float(rng.uniform(2_000.0, 20_000.0)) * spec.interval / 60.0
        volume = (
            base_volume
            * u_shape(phase, 2.0)
            * np.where(regime == 1, 1.8, 1.0)
            * lognormal_noise(rng, 0.3, spec.points)
        )
        base_spread = float(rng.uniform(2.0, 10.0))
        spread = (
            base_spread
            * u_shape(phase, 0.5)
            * np.where(regime == 1, 1.8, 1.0)
            * lognormal_noise(rng, 0.12, spec.points)
        )

        if index < clean_from:
            per = anomaly_count(spec.points, 1500)
            kinds = [kind for kind in KINDS for _ in range(per)]
            order = rng.permutation(len(kinds))
            kinds = [kinds[i] for i in order]
            lengths = [_length(rng, kind) for kind in kinds]
            for kind, window in zip(kinds, place_windows(rng, spec.points, lengths), strict=True):
                if window is None:
                    continue
                first, last = window
                if kind == "price_jump":
                    sign = 1.0 if rng.random() < 0.5 else -1.0
                    price[first:] *= 1.0 + sign * rng.uniform(0.03, 0.06)
                    labels.append(Label(dims, "price", first, last, kind))
                elif kind == "volume_burst":
                    volume[first : last + 1] *= rng.uniform(5.0, 10.0)
                    labels.append(Label(dims, "volume", first, last, kind))
                elif kind == "spread_blowout":
                    spread[first : last + 1] *= rng.uniform(6.0, 12.0)
                    labels.append(Label(dims, "spread_bps", first, last, kind))
                else:
                    price[first : last + 1] = price[first - 1]
                    labels.append(Label(dims, "price", first, last, kind))

        series.append(Series(dims, "price", price, decimals=4))
        series.append(Series(dims, "volume", np.maximum(volume, 0.0), decimals=0))
        series.append(Series(dims, "spread_bps", spread, decimals=2))
    labels.sort(key=lambda label: (label.first, label.dimensions["instrument"], label.measure))
    return Feed("market", spec, series, labels)


def _length(rng: np.random.Generator, kind: str) -> int:
    if kind == "price_jump":
        return 1
    if kind == "volume_burst":
        return int(rng.integers(2, 7))
    if kind == "spread_blowout":
        return int(rng.integers(3, 11))
    return int(rng.integers(20, 61))

"""Ops feed: a fleet of GPU hosts and one training job running on it.

Entities and their measures (one record per entity per interval, with an ``entity`` field
naming the kind: ``host``, ``gpu``, ``job`` or ``layer``):

- host (``host``): ``cpu_util`` (%, daily seasonality peaking at 14:00 UTC), ``latency_ms``
  (request latency, rising with load, log-normal noise) and ``error_count`` (Poisson, rising
  with latency);
- GPU (``host``, ``gpu``): ``gpu_util`` (%, daily seasonality of the serving load);
- training job (``job``): ``effective_tflops`` (achieved model FLOPS per GPU);
- layer of the job (``job``, ``layer``): ``grad_norm``, decaying as training converges.

Injected anomalies: ``stuck_at_zero`` (a GPU's utilisation reads 0 for 10–40 intervals),
``under_utilisation`` (a GPU at ~35 % of its load, or the job at ~45 % of its FLOPS, for 30–90
intervals), ``latency_spike`` (latency ×4–8 for 1–3 intervals), ``slow_drift`` (CPU creeping up
by 25–40 points over 2–5 hours, then a restart) and ``gradient_explosion`` (one layer's gradient
norm growing ×1.3–1.5 per interval for 8–20 intervals until the job rolls back). The last
quarter of the hosts (at least one of two or more), with their GPUs, and every layer but the
exploding one carry no anomaly.
"""

from __future__ import annotations

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
    sine_day,
)

DEFAULT_HOSTS = 4
GPUS_PER_HOST = 2
LAYERS = 8
JOB = "train-llm-7b"

# Every record names its kind of entity, so that detectors can ``match`` one kind in the topic.
HOST = {"entity": "host"}
GPU = {"entity": "gpu"}
TRAINING_JOB = {"entity": "job"}
LAYER = {"entity": "layer"}

KINDS = ("stuck_at_zero", "under_utilisation", "latency_spike", "slow_drift", "gradient_explosion")


def generate(spec: FeedSpec) -> Feed:
    hosts = spec.entities or DEFAULT_HOSTS
    clean_from = hosts - clean_count(hosts)
    phase = daily_phase(spec)
    n = spec.points
    series: list[Series] = []
    labels: list[Label] = []

    for index in range(hosts):
        host = f"gpu-node-{index + 1:02d}"
        rng = series_rng(spec.seed, "ops", host)
        dims = {"host": host}
        anomalous = index < clean_from
        cpu = (
            rng.uniform(35.0, 50.0)
            + rng.uniform(15.0, 22.0) * sine_day(phase, 14.0)
            + rng.normal(0.0, 2.5, n)
        )
        latency_spikes: list[tuple[int, int]] = []
        if anomalous:
            kinds = ["latency_spike"] * anomaly_count(n, 750)
            kinds += ["slow_drift"] * anomaly_count(n, 1500)
            lengths = [
                int(rng.integers(1, 4)) if kind == "latency_spike"
                else max(2, int(rng.uniform(2 * 3600, 5 * 3600) / spec.interval))
                for kind in kinds
            ]  # fmt: skip
            for kind, window in zip(kinds, place_windows(rng, n, lengths), strict=True):
                if window is None:
                    continue
                first, last = window
                if kind == "slow_drift":
                    ramp = np.linspace(0.0, rng.uniform(25.0, 40.0), last - first + 1)
                    cpu[first : last + 1] += ramp
                    labels.append(Label(dims, "cpu_util", first, last, kind))
                else:
                    latency_spikes.append(window)
        cpu = np.clip(cpu, 0.0, 100.0)
        latency = (
            rng.uniform(30.0, 60.0)
            * (1.0 + 2.0 * (cpu / 100.0) ** 3)
            * lognormal_noise(rng, 0.1, n)
        )
        # Errors follow the ordinary latency; a spike is a latency anomaly, not an error storm.
        errors = rng.poisson(0.3 + latency / 150.0)
        for first, last in latency_spikes:
            latency[first : last + 1] *= rng.uniform(4.0, 8.0)
            labels.append(Label(dims, "latency_ms", first, last, "latency_spike"))
        series.append(Series(dims, "cpu_util", cpu, 1, HOST))
        series.append(Series(dims, "latency_ms", latency, 1, HOST))
        series.append(Series(dims, "error_count", errors, 0, HOST))

        for gpu_index in range(GPUS_PER_HOST):
            gpu = str(gpu_index)
            gpu_rng = series_rng(spec.seed, "ops", host, gpu)
            gpu_dims = {"host": host, "gpu": gpu}
            util = (
                gpu_rng.uniform(55.0, 65.0)
                + gpu_rng.uniform(20.0, 28.0) * sine_day(phase, 15.0)
                + gpu_rng.normal(0.0, 3.0, n)
            )
            if anomalous:
                per = anomaly_count(n, 1500)
                kinds = ["stuck_at_zero"] * per + ["under_utilisation"] * per
                lengths = [
                    int(gpu_rng.integers(10, 41)) if kind == "stuck_at_zero"
                    else int(gpu_rng.integers(30, 91))
                    for kind in kinds
                ]  # fmt: skip
                windows = place_windows(gpu_rng, n, lengths)
                for kind, window in zip(kinds, windows, strict=True):
                    if window is None:
                        continue
                    first, last = window
                    if kind == "stuck_at_zero":
                        util[first : last + 1] = 0.0
                    else:
                        util[first : last + 1] *= gpu_rng.uniform(0.3, 0.4)
                    labels.append(Label(gpu_dims, "gpu_util", first, last, kind))
            series.append(Series(gpu_dims, "gpu_util", np.clip(util, 0.0, 100.0), 1, GPU))

    rng = series_rng(spec.seed, "ops", JOB)
    job_dims = {"job": JOB}
    tflops = rng.uniform(170.0, 190.0) * lognormal_noise(rng, 0.025, n)
    per = anomaly_count(n, 1500)
    lengths = [int(rng.integers(30, 91)) for _ in range(per)]
    for window in place_windows(rng, n, lengths):
        if window is not None:
            first, last = window
            tflops[first : last + 1] *= rng.uniform(0.4, 0.5)
            labels.append(Label(job_dims, "effective_tflops", first, last, "under_utilisation"))
    series.append(Series(job_dims, "effective_tflops", tflops, 1, TRAINING_JOB))

    exploding_layer = int(rng.integers(0, LAYERS))
    steps = np.arange(n, dtype=np.float64)
    for layer_index in range(LAYERS):
        layer = f"layer-{layer_index:02d}"
        layer_rng = series_rng(spec.seed, "ops", JOB, layer)
        layer_dims = {"job": JOB, "layer": layer}
        scale = layer_rng.uniform(0.5, 2.0)
        norm = scale * (1.0 + 1.5 * np.exp(-steps / 800.0)) * lognormal_noise(layer_rng, 0.08, n)
        if layer_index == exploding_layer:
            lengths = [int(layer_rng.integers(8, 21)) for _ in range(anomaly_count(n, 600))]
            for window in place_windows(layer_rng, n, lengths):
                if window is None:
                    continue
                first, last = window
                growth = layer_rng.uniform(1.3, 1.5) ** np.arange(1, last - first + 2)
                norm[first : last + 1] *= growth
                labels.append(Label(layer_dims, "grad_norm", first, last, "gradient_explosion"))
        series.append(Series(layer_dims, "grad_norm", norm, 4, LAYER))

    labels.sort(key=lambda label: (label.first, sorted(label.dimensions.items()), label.measure))
    return Feed("ops", spec, series, labels)

"""sampling.speed: the share of the machine's matmul peak a generation run reaches, and when it is measured."""

from __future__ import annotations

import pytest

from sampling import speed


def test_matmul_peak_is_measured_on_the_threads_asked_and_restores_the_count():
    import torch

    before = torch.get_num_threads()
    peaks = speed.matmul_peaks_gflops(1, size=256, reps=2)
    assert "torch.mm" in peaks and all(value > 0 for value in peaks.values())
    assert torch.get_num_threads() == before


def test_generation_speed_measures_the_peak_only_for_a_timed_cpu_run(monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "matmul_peak_gflops", lambda threads: calls.append(threads) or 200.0)
    monkeypatch.setattr(speed, "parameter_count", lambda model: 135_000_000)
    # 4,000 tokens in 10 s on 2 threads: 400 tokens/s x 2 x 135M FLOPs = 108 GFLOP/s of 200
    assert speed.generation_speed(4000, 10.0, "m", 2) == {
        "tokens_per_s": 400.0,
        "matmul_peak_gflops": 200.0,
        "peak_share": 0.54,
    }
    assert calls == [2]
    # shorter than MIN_TIMED_SECONDS, or no CPU thread count (a GPU, the transformers engine): the rate only
    assert speed.generation_speed(400, speed.MIN_TIMED_SECONDS / 2, "m", 2) == {"tokens_per_s": 80.0}
    assert speed.generation_speed(4000, 10.0, "m", None) == {"tokens_per_s": 400.0}
    assert calls == [2]


@pytest.mark.parametrize(
    ("figures", "threads", "text"),
    [
        ({"tokens_per_s": 80.0}, 2, "80 tokens/s"),
        (
            {"tokens_per_s": 1020.4, "matmul_peak_gflops": 419.2, "peak_share": 0.57},
            2,
            "1,020 tokens/s on 2 threads, 57% of this machine's fp32 matmul peak (419 GFLOP/s)",
        ),
    ],
)
def test_the_figures_read_as_one_line(figures, threads, text):
    assert speed.describe(figures, threads) == text

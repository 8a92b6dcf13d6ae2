"""The train-step benchmark's 'needed % peak' column is the speed the 0.5 target asks for."""
import pytest

from benchmarks import train_step


def test_percent_of_peak_is_work_over_time_over_peak():
  # 100 GFLOP in 1 s is 100 GFLOP/s: half of a 200 GFLOP/s peak.
  assert train_step.percent_of_peak(1.0, 100.0, 200.0) == pytest.approx(50.0)
  # Half the time needs twice the speed; over 100% the target is out of reach at that peak.
  assert train_step.percent_of_peak(0.5, 100.0, 150.0) == pytest.approx(133.333, rel=1e-4)

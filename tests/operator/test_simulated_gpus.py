"""The simulated kubelet's GPU assignment is read from pod status only (never from labels or
annotations a tenant writes), and only the condition of that exact type counts."""

from __future__ import annotations

from perseus_operator.state import SIMULATED_GPUS_CONDITION, simulated_gpus


def test_simulated_gpus_come_from_the_status_condition() -> None:
    status = {
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": SIMULATED_GPUS_CONDITION, "status": "True", "message": "GPU-a, GPU-b"},
        ]
    }
    assert simulated_gpus(status) == ("GPU-a", "GPU-b")
    assert simulated_gpus({"conditions": [{"type": "Ready", "status": "True"}]}) is None
    false = {"conditions": [{"type": SIMULATED_GPUS_CONDITION, "status": "False", "message": "x"}]}
    assert simulated_gpus(false) is None
    assert simulated_gpus({}) is None

"""Simulated GPUs played from a stage profile, so the whole system runs and is tested without GPUs:
the sidecar's backend over a simulated node's driver state (`simnode`, which says what it holds).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from perseus_profiles import StageProfile
from perseus_sidecar.gpu.base import (
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuNotFoundError,
    GpuNotSupportedError,
)
from perseus_sidecar.gpu.simnode import (
    NODE_FILE,
    PROFILE_FILE,
    NodeSettings,
    SimulatedGpu,
    perturbed_profile,
    read_node,
    validate_settings,
)
from perseus_sidecar.gpu.simrecord import flocked, write_atomic

__all__ = ["SimulatedBackend"]


class SimulatedBackend(GpuBackend):
    """`num_gpus` simulated GPUs whose supported clocks are the profile's (see module doc)."""

    def __init__(
        self,
        profile: StageProfile,
        num_gpus: int,
        state_dir: Path,
        *,
        node_name: str = "sim",
        time_scale: float = 1.0,
        energy_update_interval_s: float = 0.05,
        blocking_power_w: float = 83.64,
        perturbation: float = 0.0,
        seed: int = 0,
    ) -> None:
        validate_settings(
            node_name, num_gpus, time_scale, energy_update_interval_s, blocking_power_w
        )
        truth = perturbed_profile(profile, perturbation, seed)
        self.profile = profile
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.settings = self._open_state(
                NodeSettings(
                    node_name=node_name,
                    num_gpus=num_gpus,
                    time_scale=time_scale,
                    epoch_wall_s=time.time(),
                    energy_update_interval_s=energy_update_interval_s,
                    blocking_power_w=blocking_power_w,
                    perturbation=perturbation,
                    seed=seed,
                ),
                truth,
            )
        except OSError as exc:
            raise GpuError(f"cannot use simulated GPU state dir {self.state_dir}: {exc}") from None
        self._clocks_mhz = profile.frequencies_mhz
        self._gpus = {
            gpu.uuid: gpu
            for gpu in (
                SimulatedGpu(self.state_dir, i, self.settings, profile.max_frequency_mhz)
                for i in range(num_gpus)
            )
        }
        self._reported_mj: dict[str, int] = {}
        now_s = self.settings.now_s()
        for gpu in self._gpus.values():
            gpu.ensure_energy(now_s)

    def _open_state(self, wanted: NodeSettings, truth: StageProfile) -> NodeSettings:
        """Keep an existing node's epoch (a restarted sidecar must not disturb a running trainer)
        unless the clockwork changed; then carry every counter over to a fresh epoch."""
        with flocked(self.state_dir / "node.lock"):
            old = read_node(self.state_dir)
            settings = wanted
            if old is not None and old.same_clockwork(wanted):
                settings = NodeSettings(**{**asdict(wanted), "epoch_wall_s": old.epoch_wall_s})
            elif old is not None:
                for i in range(min(old.num_gpus, wanted.num_gpus)):
                    old_gpu = SimulatedGpu(self.state_dir, i, old, truth.max_frequency_mhz)
                    old_gpu.rebase_energy(wanted.now_s())
                    old_gpu.close()
            write_atomic(self.state_dir / PROFILE_FILE, truth.to_csv())
            write_atomic(self.state_dir / NODE_FILE, json.dumps(asdict(settings)))
        return settings

    def _gpu(self, uuid: str) -> SimulatedGpu:
        try:
            return self._gpus[uuid]
        except KeyError:
            raise GpuNotFoundError(f"no simulated GPU {uuid!r} on this node") from None

    def gpu(self, uuid: str) -> SimulatedGpu:
        """The driver state of one GPU (for tests and the trainer in the same process)."""
        return self._gpu(uuid)

    def list_gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=gpu.index,
                uuid=gpu.uuid,
                name="Simulated GPU",
                supported_sm_clocks_mhz=self._clocks_mhz,
            )
            for gpu in self._gpus.values()
        ]

    def set_locked_sm_clock(self, uuid: str, clock_mhz: int) -> None:
        gpu = self._gpu(uuid)
        if clock_mhz not in self._clocks_mhz:
            raise GpuNotSupportedError(
                f"{clock_mhz} MHz is not a supported clock of {uuid} "
                f"({self._clocks_mhz[-1]}-{self._clocks_mhz[0]} MHz in the profile's steps)"
            )
        gpu.set_locked_sm_clock(clock_mhz)

    def reset_locked_clocks(self, uuid: str) -> None:
        self._gpu(uuid).set_locked_sm_clock(None)

    def locked_sm_clock_mhz(self, uuid: str) -> int | None:
        return self._gpu(uuid).locked_sm_clock_mhz()

    def total_energy_mj(self, uuid: str) -> int:
        gpu = self._gpu(uuid)
        value_mj = round(gpu.counter_energy_j(self.settings.now_s()) * 1000.0)
        # A trainer lagging behind its simulated schedule may record work after the counter's
        # update instant was read; a real counter never runs backwards.
        value_mj = max(value_mj, self._reported_mj.get(uuid, 0))
        self._reported_mj[uuid] = value_mj
        return value_mj

    def current_sm_clock_mhz(self, uuid: str) -> int:
        return self._gpu(uuid).effective_clock_mhz()

    def power_w(self, uuid: str) -> float:
        return self._gpu(uuid).power_w(self.settings.now_s())

    def close(self) -> None:
        for gpu in self._gpus.values():
            gpu.close()

"""Where a policy's stage profile comes from: an imported ConfigMap, the profile store, or a
sweep measured through the sidecars; a fitting profile is stored for the next policy of the same
job shape and key.

The controller calls :meth:`ProfileSource.ensure` on each pass; the result lands in the policy's
runtime (`profile`, or `profile_error` with its reason, and a progress message).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from perseus_operator.model import CLUSTER_SCOPE, EnergyPolicySpec
from perseus_operator.profiling import ProfileSession
from perseus_operator.sidecars import NodeSnapshot, SidecarGateway, SidecarUnreachableError
from perseus_operator.state import PolicyRuntime, Store
from perseus_operator.status_views import (
    ImplausibleProfileError,
    check_plausible,
    check_profile,
)
from perseus_profiles import ProfileError, StageProfile, parse_profile_csv

__all__ = ["ProfileSource"]

log = logging.getLogger("perseus.operator")


class ProfileSource:
    """Imports, looks up, measures and stores profiles for every policy of the operator."""

    def __init__(self, store: Store, gateway: SidecarGateway, *, profile_namespace: str) -> None:
        self.store = store
        self.gateway = gateway
        self.profile_namespace = profile_namespace

    async def ensure(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, snaps: Mapping[str, NodeSnapshot]
    ) -> None:
        """Bring `rt.profile` in line with the spec and the nodes' GPU model: kept while they
        stay the same, else imported, taken from the store, or measured one step per pass."""
        model, clocks = next(iter(sorted(s.gpu_model for s in snaps.values())))
        source = spec.profile
        # A per-chunk profile (interleaved 1F1B) is stored apart from the model's 1F1B one.
        chunks = spec.pipeline.virtual_stages
        store_key = spec.profile_key if chunks == 1 else f"{spec.profile_key}@v{chunks}"
        sig = (
            model,
            spec.pipeline.stages,
            spec.pipeline.tensor_parallel,
            store_key,
            spec.profile_scope,
            source.import_.config_map if source.import_ else None,
            source.import_.key if source.import_ else None,
        )
        if rt.profile_sig == sig and (rt.profile is not None or rt.profile_error is not None):
            return
        if rt.profile_sig != sig:
            rt.profile, rt.profile_error, rt.profiling, rt.profile_sig = None, None, None, sig
            rt.profile_error_reason = "ProfileInvalid"
        all_clocks = frozenset.intersection(*(s.gpu_model[1] for s in snaps.values()))
        scope = CLUSTER_SCOPE if spec.profile_scope == "Cluster" else rt.namespace
        if source.import_ is not None:
            # The policy names its own profile: a stored one never replaces it.
            imp = source.import_
            text = await self.store.read_configmap_key(rt.namespace, imp.config_map, imp.key)
            if text is None:
                rt.profile_msg = f"waiting for ConfigMap {imp.config_map} with key {imp.key}"
                rt.profile_sig = None  # look again next time
                return
            try:
                profile = check_profile(parse_profile_csv(text), spec, all_clocks)
            except ProfileError as exc:
                self._profile_failed(rt, f"ConfigMap {imp.config_map} key {imp.key}: {exc}", exc)
                return
            source_note = f"imported from {rt.namespace}/{imp.config_map}"
        else:
            # Looked up before a sweep starts, not on every pass of it.
            if rt.profiling is None and await self._use_stored_profile(
                rt, spec, scope, model, all_clocks
            ):
                return
            assert source.measure is not None
            profile_or_none = await self._measure_profile(rt, spec, snaps, clocks)
            if profile_or_none is None:
                return
            try:
                profile = check_plausible(profile_or_none)
            except ProfileError as exc:
                self._profile_failed(rt, f"the measured profile: {exc}", exc)
                return
            source_note = "measured through the sidecars"
        name = await self.store.store_profile(
            self.profile_namespace,
            scope=scope,
            gpu_model=model,
            stages=spec.pipeline.stages,
            tensor_parallel=spec.pipeline.tensor_parallel,
            key=store_key,
            csv_text=profile.to_csv(),
            source=source_note,
            blocking_power_w=rt.blocking_w,
        )
        rt.profile, rt.profile_cm = profile, name
        rt.profile_msg = f"{source_note}; stored as {self.profile_namespace}/{name} ({model})"

    @staticmethod
    def _profile_failed(rt: PolicyRuntime, message: str, exc: ProfileError) -> None:
        rt.profile_error = message
        implausible = isinstance(exc, ImplausibleProfileError)
        rt.profile_error_reason = "ProfileImplausible" if implausible else "ProfileInvalid"

    async def _use_stored_profile(
        self,
        rt: PolicyRuntime,
        spec: EnergyPolicySpec,
        scope: str,
        model: str,
        clocks: frozenset[int],
    ) -> bool:
        """Take the profile stored for this scope and key, if one is there and fits: a measuring
        policy then skips its sweep."""
        stored = await self.store.load_profile(
            self.profile_namespace,
            scope=scope,
            gpu_model=model,
            stages=spec.pipeline.stages,
            tensor_parallel=spec.pipeline.tensor_parallel,
            key=spec.profile_key,
        )
        if stored is None:
            return False
        try:
            profile = check_profile(parse_profile_csv(stored[1]), spec, clocks)
        except ProfileError as exc:
            log.warning("stored profile %s unusable (%s); measuring again", stored[0], exc)
            return False
        rt.profile, rt.profile_cm, rt.blocking_w = profile, stored[0], stored[2]
        rt.profiling = None
        rt.profile_msg = f"stored profile {self.profile_namespace}/{stored[0]} ({model})"
        return True

    async def _measure_profile(
        self,
        rt: PolicyRuntime,
        spec: EnergyPolicySpec,
        snaps: Mapping[str, NodeSnapshot],
        clocks: frozenset[int],
    ) -> StageProfile | None:
        measure = spec.profile.measure
        assert measure is not None
        if rt.profiling is None:
            rt.profiling = ProfileSession.create(
                clocks,
                measure,
                stages=spec.pipeline.stages,
            )
        session = rt.profiling
        addresses = {n: s.address for n, s in snaps.items()}
        try:
            done = await session.step(self.gateway, addresses, rt.namespace, rt.name)
        except (SidecarUnreachableError, ProfileError) as exc:
            rt.profile_msg = f"profiling: {exc}"
            return None
        rt.profile_msg = session.progress()
        if not done:
            return None
        rt.profiling = None
        rt.blocking_w = session.blocking_power_w()
        if rt.blocking_w is None and spec.blocking_power_w is None:
            rt.profile_error = "profiling measured no blocking power: set spec.blockingPowerW"
            return None
        try:
            return session.result()
        except ProfileError as exc:
            rt.profile_error = f"profiling produced no usable profile: {exc}"
            return None

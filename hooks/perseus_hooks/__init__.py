"""Perseus training hooks: tell the node's Perseus sidecar when each forward/backward begins and
ends. Standard library only (its own distribution, `perseus-hooks`, with no dependencies), so any
training image can install it.

A call on the training thread only timestamps the event and hands it to a background thread;
that thread registers the rank over HTTP, holds one TCP connection to the sidecar's event port
and streams the events as lines (the protocol: :mod:`perseus_hooks.wire`). If the sidecar is down,
slow or refuses the rank, training goes on: one warning is logged, events are buffered (bounded,
oldest dropped) and the thread retries with backoff.

Typical use::

    import perseus_hooks as hooks

    perseus = hooks.register(rank=rank, pipeline_rank=stage, data_rank=dp, gpu_uuid=uuid)
    for step in range(steps):
        for kind, microbatch in schedule:
            with perseus.instruction(kind, microbatch):
                run(kind, microbatch)
        perseus.iteration_end()

An interleaved pipeline (Megatron-LM's virtual stages: the stage runs v model chunks) names the
chunk of every instruction: ``perseus.instruction(kind, microbatch, chunk=c)``.

The sidecar address, pod identity and job token come from the environment a Kubernetes pod is
given (``PERSEUS_SIDECAR_HOST`` from the downward API's ``status.hostIP``,
``PERSEUS_SIDECAR_PORT``, ``PERSEUS_POD_NAMESPACE``, ``PERSEUS_POD_NAME``,
``PERSEUS_JOB_TOKEN_FILE``, and ``PERSEUS_SIDECAR_EVENT_PORT`` where the event port reaches the
pod under another number than the sidecar announces, e.g. a remapped host port); arguments
override them. Without a sidecar host the hooks are a no-op, so the same script runs anywhere.
"""

from perseus_hooks.config import DEFAULT_JOB_TOKEN_FILE, HooksConfig
from perseus_hooks.hooks import (
    Hooks,
    InstructionKind,
    default_hooks,
    instruction,
    instruction_begin,
    instruction_end,
    iteration_end,
    register,
)

__all__ = [
    "DEFAULT_JOB_TOKEN_FILE",
    "Hooks",
    "HooksConfig",
    "InstructionKind",
    "default_hooks",
    "instruction",
    "instruction_begin",
    "instruction_end",
    "iteration_end",
    "register",
]

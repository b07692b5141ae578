"""A real (small) PyTorch pipeline with Perseus hooks: a hand-written synchronous 1F1B schedule.

An MLP is split into one block per stage, one process per stage (CPU, gloo). Each stage follows
the 1F1B order (min(S-s-1, M) warm-up forwards, then one forward and one backward in turn, then
the remaining backwards: `perseus_hooks.pipeline.stage_order`, the order the planner plans
and the sidecar expects); activations go down the pipeline and gradients up, with non-blocking
sends so that neighbours never wait on each other's sends. The Perseus hooks wrap the compute of
every forward and backward, and mark each iteration's end after the optimizer step.

    python examples/pytorch_1f1b.py --stages 4 --microbatches 6 --iterations 3

Launches its own processes (or runs as one rank under torchrun, which sets RANK and WORLD_SIZE).
The hooks read the sidecar's address and the job token from the environment a pod gets
(PERSEUS_SIDECAR_HOST, PERSEUS_SIDECAR_PORT, PERSEUS_POD_NAMESPACE, PERSEUS_POD_NAME,
PERSEUS_JOB_TOKEN_FILE); without PERSEUS_SIDECAR_HOST they do nothing and training runs as is.
Each rank's GPU UUID comes from CUDA when present, else from --gpu-uuids (one per rank).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import spawn

import perseus_hooks as hooks
from perseus_hooks.pipeline import stage_order

WIDTH = 64
ACTIVATION_TAG = 1
GRADIENT_TAG = 2


def build_stage(stage: int) -> nn.Module:
    torch.manual_seed(1234 + stage)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))


def gpu_uuid(rank: int, uuids: Sequence[str]) -> str | None:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        return f"GPU-{torch.cuda.get_device_properties(local).uuid}"
    return uuids[rank] if rank < len(uuids) else None


def _keep(sends: list[dist.Work], work: dist.Work | None) -> None:
    if work is not None:
        sends.append(work)


def train(rank: int, world: int, args: argparse.Namespace) -> float:
    """Run the iterations on stage `rank`; returns the last stage's final loss (else NaN)."""
    stage, last = rank, rank == world - 1
    perseus = hooks.register(
        rank=rank, pipeline_rank=stage, data_rank=0, gpu_uuid=gpu_uuid(rank, args.gpu_uuids)
    )
    if perseus.enabled and not perseus.wait_connected(args.connect_timeout_s):
        print(f"rank {rank}: no sidecar connection yet; training anyway", file=sys.stderr)
    model = build_stage(stage)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(42)
    batch = args.microbatch_size
    loss_value = float("nan")
    for _ in range(args.iterations):
        inputs = torch.randn(args.microbatches, batch, WIDTH, generator=generator)
        targets = torch.sin(inputs.sum(dim=2, keepdim=True)).expand(-1, -1, WIDTH)
        optimizer.zero_grad()
        stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        sends: list[dist.Work] = []
        for forward, m, _ in stage_order(world, args.microbatches, stage):
            if forward:
                if stage == 0:
                    x = inputs[m]
                else:
                    x = torch.empty(batch, WIDTH)
                    dist.recv(x, src=stage - 1, tag=ACTIVATION_TAG)
                    x.requires_grad_()
                with perseus.instruction("forward", m):
                    y = model(x)
                    if last:
                        y = nn.functional.mse_loss(y, targets[m]) / args.microbatches
                        loss_value = float(y.detach()) * args.microbatches
                stash[m] = (x, y)
                if not last:
                    _keep(sends, dist.isend(y.detach(), dst=stage + 1, tag=ACTIVATION_TAG))
            else:
                x, y = stash.pop(m)
                grad = None
                if not last:
                    grad = torch.empty(batch, WIDTH)
                    dist.recv(grad, src=stage + 1, tag=GRADIENT_TAG)
                with perseus.instruction("backward", m):
                    torch.autograd.backward(y, grad)
                if stage > 0:
                    assert x.grad is not None
                    _keep(sends, dist.isend(x.grad, dst=stage - 1, tag=GRADIENT_TAG))
        for work in sends:
            work.wait()
        optimizer.step()
        perseus.iteration_end()
    perseus.close()
    return loss_value


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        loss = train(rank, world, args)
        if rank == world - 1:
            print(f"final loss {loss:.6f}", flush=True)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages = processes")
    parser.add_argument("--microbatches", type=int, default=6)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument(
        "--gpu-uuids",
        type=lambda text: [u for u in text.split(",") if u],
        default=[],
        help="comma-separated GPU UUID of each rank (without CUDA, e.g. simulated GPUs)",
    )
    parser.add_argument("--connect-timeout-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.stages < 1 or args.microbatches < 1 or args.iterations < 1:
        parser.error("--stages, --microbatches and --iterations must be >= 1")
    torch.set_num_threads(1)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return 0
    spawn(_worker, args=(args.stages, _free_port(), args), nprocs=args.stages)  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a rank reaches the others and what its links carry: CommConfig and its flags.

Declares its own flags, in two groups (how ranks connect; what travels between stages), and
builds itself from the parsed arguments; the command line (trainer.cli) composes it with the
other configs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch

from comm.admission import TOKEN_ENV, token_from
from comm.compress import CODECS, GROUP, OUTLIERS, Codec, gradient_codec_for

BACKENDS = ("gloo", "nccl")
DEFAULT_DIST_URL = "tcp://127.0.0.1:7033"


@dataclass(frozen=True)
class CommConfig:
    dist_url: str
    backend: str = "gloo"
    dp_backend: str = "gloo"
    timeout_s: float = 300.0
    net_interface: str | None = None
    pp_compress: str = "none"  # activations between stages
    pp_compress_grad: str = "none"  # their gradients, coming back (the CLI's default: gradient_codec_for)
    pp_compress_group: int = GROUP  # int8/int4: channels sharing one scale (0: one per token)
    pp_compress_outliers: int = OUTLIERS  # int8/int4: largest values per token sent exactly
    link_bandwidth_mbps: float = 0.0  # emulated link (0: not held)
    link_latency_ms: float = 0.0
    # replicas may leave (comm.membership): the store runs in a process of its own, a lost
    # replica's data-parallel partners regroup instead of stopping
    elastic: bool = False
    # standby processes (ranks world_size .. world_size + spares - 1) that take a lost rank's
    # place: like --elastic, the run's store runs in a process of its own and ranks regroup
    spares: int = 0
    # Send Gloo's tensors through host buffers even when computing on the CPU: the path that
    # CUDA compute over Gloo takes, for tests on machines without a GPU. Not a flag.
    host_staging: bool = False
    # the run token (comm.admission): never printed, written or sent, so kept out of repr
    run_token: str | None = field(default=None, repr=False)

    @property
    def regroups(self) -> bool:
        """Whether ranks move to a new generation when one is lost (--elastic or --spares)."""
        return self.elastic or self.spares > 0

    @property
    def emulates_link(self) -> bool:
        return self.link_bandwidth_mbps > 0 or self.link_latency_ms > 0

    def __post_init__(self) -> None:
        for name in (self.pp_compress, self.pp_compress_grad):
            Codec(name, self.pp_compress_group, self.pp_compress_outliers)  # raises on an unknown name
        if self.net_interface:
            import psutil

            interfaces = psutil.net_if_addrs()
            if self.net_interface not in interfaces:
                raise ValueError(
                    f"--net-interface {self.net_interface!r} does not exist here; choose one of {sorted(interfaces)}"
                )
        if self.link_bandwidth_mbps < 0 or self.link_latency_ms < 0:
            raise ValueError("--link-bandwidth-mbps and --link-latency-ms must be >= 0")
        if not self.dist_url.startswith(("tcp://", "env://", "file://")):
            raise ValueError(f"--dist-url {self.dist_url!r} should look like tcp://<master-ip>:<port> or env://")
        if self.run_token is not None and self.dist_url.startswith("file://"):
            raise ValueError("a run token needs a store to prove itself through: use a tcp:// (or env://) --dist-url, "
                             "or no token")  # fmt: skip
        for flag, value in (("--dist-backend", self.backend), ("--dp-backend", self.dp_backend)):
            if value not in BACKENDS:
                raise ValueError(f"{flag} {value!r} is not one of {BACKENDS}")
            if value == "nccl" and not torch.cuda.is_available():
                raise ValueError(f"{flag} nccl needs CUDA, which this machine lacks; use {flag} gloo")
        if self.timeout_s <= 0:
            raise ValueError("--comm-timeout must be a positive number of seconds")
        if self.spares < 0:
            raise ValueError(f"--spares {self.spares} must be 0 or more")

    @staticmethod
    def add_flags(connection: argparse._ArgumentGroup, links: argparse._ArgumentGroup) -> None:
        """How ranks connect into ``connection``; what travels between stages into ``links``."""
        connection.add_argument(
            "--dist-url", default=None, help=f"tcp://<rank-0 address>:<port> (default {DEFAULT_DIST_URL})"
        )
        connection.add_argument("--net-interface", default=None, help="network interface Gloo/NCCL bind to, e.g. eth0")
        connection.add_argument(
            "--dist-backend",
            choices=BACKENDS,
            default=None,
            help="pipeline backend (default: nccl on CUDA, else gloo)",
        )
        connection.add_argument(
            "--dp-backend",
            choices=BACKENDS,
            default=None,
            help="data-parallel backend (default: as --dist-backend's)",
        )
        connection.add_argument(
            "--elastic",
            action="store_true",
            help="replicas may leave and come back: when a rank is lost, its whole replica leaves and the other "
            "complete pipelines go on without a restart, the global batch split over fewer replicas; its ranks "
            "started again with the same flags join the live run at a step boundary (--dp-mode allreduce; with "
            "--shard-optimizer or --dp-mode local or diloco both go through a checkpoint; the run's store runs in a "
            "process of its own that rank 0 starts)",
        )
        connection.add_argument(
            "--spares",
            type=int,
            default=0,
            metavar="K",
            help="K standby processes, started with --rank world-size .. world-size+K-1 and the same flags (under "
            "torchrun $WORLD_SIZE counts them; --world-size does not): they load nothing and wait; when a rank is "
            "lost a spare takes its stage and replica, gets its state from a live replica of the stage, and the "
            "step is done again, with no restart (a rank with a preemption notice is replaced the same way once "
            "its step is committed, nothing redone); with one replica every rank rolls back to the last checkpoint "
            "in-process instead, as with --shard-optimizer or --dp-mode local or diloco",
        )
        connection.add_argument(
            "--comm-timeout", type=float, default=300.0, help="seconds before a silent peer is an error"
        )
        connection.add_argument(
            "--run-token",
            default=None,
            metavar="SECRET",
            help="a secret every rank proves it knows (an HMAC challenge) before it may join the run; better given "
            f"as the environment variable {TOKEN_ENV}, which a process list does not show. Never written or "
            "logged; it does not encrypt the traffic (use a tunnel between sites)",
        )
        links.add_argument(
            "--pp-compress",
            choices=CODECS,
            default="none",
            help="activations between stages: 16-bit casts, or int8/int4 with group-wise scales and each "
            "token's largest values sent exactly (robust to outlier channels)",
        )
        links.add_argument(
            "--pp-compress-grad",
            choices=CODECS,
            default=None,
            help="their gradients on the way back (int8/int4 round stochastically); default: what the "
            "link's activations use, int8 for int8/int4 activations, none for none",
        )
        links.add_argument(
            "--pp-compress-group",
            type=int,
            default=GROUP,
            help="int8/int4: channels sharing one scale (0: one scale per token)",
        )
        links.add_argument(
            "--pp-compress-outliers",
            type=int,
            default=OUTLIERS,
            help="int8/int4 activations: values of largest magnitude per token sent exactly beside the quantised "
            "rest (gradients send none: their outlier channels are not larger)",
        )
        links.add_argument(
            "--link-bandwidth-mbps",
            type=float,
            default=0.0,
            help="emulate a link: hold this rank's sends to this rate (0: off)",
        )
        links.add_argument("--link-latency-ms", type=float, default=0.0, help="emulate a link: delay per message")

    @classmethod
    def from_args(cls, args: argparse.Namespace, use_cuda: bool) -> CommConfig:
        """``use_cuda``: whether this rank computes on CUDA (NCCL's backends are its default)."""
        default_backend = "nccl" if use_cuda else "gloo"
        for flag, backend in (("--dist-backend", args.dist_backend), ("--dp-backend", args.dp_backend)):
            if backend == "nccl" and not use_cuda:
                raise ValueError(f"{flag} nccl moves CUDA tensors only; add --use-cuda true or use {flag} gloo")
        return cls(
            dist_url=args.dist_url or ("env://" if "MASTER_ADDR" in os.environ else DEFAULT_DIST_URL),
            backend=args.dist_backend or default_backend,
            dp_backend=args.dp_backend or default_backend,
            timeout_s=args.comm_timeout,
            net_interface=args.net_interface,
            pp_compress=args.pp_compress,
            pp_compress_grad=args.pp_compress_grad or gradient_codec_for(args.pp_compress),
            pp_compress_group=args.pp_compress_group,
            pp_compress_outliers=args.pp_compress_outliers,
            link_bandwidth_mbps=args.link_bandwidth_mbps,
            link_latency_ms=args.link_latency_ms,
            elastic=args.elastic,
            spares=args.spares,
            run_token=token_from(args.run_token),
        )

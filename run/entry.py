"""How a process enters a run and stays in it: at launch (connect, agree on the checkpoint and a
healthy start), joining a live elastic run, waiting as a spare, and again after a roll-back to
the last checkpoint (``RollBack``); each ends in ``Supervisor.train`` (run.supervisor) around the
rank's trainer (trainer.loop)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch.distributed import Store

from comm.membership import live_run, wait_as_spare
from comm.process_group import Communicator
from comm.rendezvous import elastic_store
from comm.topology import Topology
from modules import describe_model
from observability.metrics import ONCE, setup_logging
from run.elastic import ElasticController, RollBack
from run.preemption import PreemptionNotice
from run.supervisor import Supervisor
from trainer.config import RunConfig
from trainer.loop import Trainer
from trainer.resume import agree_on_resume, probe_disks
from trainer.startup import Plan, agree_on_start, place_stage, plan_stage, set_threads, stage_memory_limits

log = logging.getLogger(__name__)


def run(cfg: RunConfig) -> None:
    plan = plan_stage(cfg)  # every check of the flags, before any rank waits for another
    # from here a SIGTERM or SIGUSR1 is a notice: the run stops at a step boundary with a checkpoint
    notice = PreemptionNotice(cfg.checkpoint.preempt_grace_s)
    notice.install()
    store = elastic_store(cfg.comm.dist_url, cfg.launch_rank, cfg.comm.timeout_s) if cfg.comm.regroups else None
    # started again while the run trains: join it (a spare only ever takes a lost rank's place)
    live = live_run(store) if store is not None and cfg.spare_rank is None else None
    comm = supervisor = None
    try:
        if cfg.spare_rank is not None:
            supervisor = stand_by(cfg, store, notice)
            if supervisor is None:
                if notice.pending:
                    log.info("preempted (%s) while waiting: this spare leaves", notice.signal_name)
                else:
                    log.info("the run finished without needing this spare")
                return
        elif live is not None:
            supervisor = join_run(cfg, plan, store, live, notice)
        else:
            comm = Communicator.connect(cfg.topology, cfg.comm, torch.device(cfg.device), link_ends=plan.tied,
                                        side_group=cfg.dp.side_group, store=store)  # fmt: skip
            supervisor = start_run(cfg, plan, comm, notice)
        while True:
            try:
                supervisor.train()
                break
            except RollBack as back:
                supervisor = roll_back(supervisor, back)
    except BaseException as err:
        trainer = supervisor.trainer if supervisor is not None else None
        comm = trainer.comm if trainer is not None and trainer.comm is not None else comm
        if comm is not None:
            comm.close(error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
        raise
    finally:
        notice.uninstall()
    supervisor.trainer.comm.close()  # a joiner's communicator is made in join_run


def start_run(cfg: RunConfig, plan: Plan, comm: Communicator, notice: PreemptionNotice) -> Supervisor:
    """Every rank at launch: split the layers, agree on the checkpoint to resume from, set up,
    and agree that every rank is ready."""
    if cfg.model.layers_per_stage is None:  # the split by compute, within each stage's memory
        plan = place_stage(cfg, plan, stage_memory_limits(comm, torch.device(cfg.device)))
    disks = probe_disks(comm, cfg.checkpoint.path)
    log.info("checkpoints: %s", disks.describe(), extra=ONCE)
    if cfg.checkpoint.resume:  # the step every rank resumes from, its files brought onto every disk
        agree_on_resume(comm, cfg, plan.layers, disks)
    trainer = Trainer(cfg, plan, comm, disks)
    error = None
    try:
        trainer.setup()
    except Exception as err:  # noqa: BLE001 - not swallowed: every rank re-raises it below
        error = f"{type(err).__name__}: {err}"
    hosts = agree_on_start(comm, cfg, trainer.state.step, error)
    comm.start_heartbeat()
    trainer.prepare_objective()
    threads = set_threads(hosts)
    log.info("layers %s, %d threads, %s", list(plan.layers), threads, cfg.device)
    if comm.topo.rank == 0:
        log.info("model: %s", describe_model(plan.model_config))
    elastic = None
    if cfg.comm.regroups:  # replicas leaving and joining, spares taking lost ranks' places
        elastic = ElasticController(trainer)
        elastic.start(plan.layers)
    return Supervisor(trainer, notice, elastic)


def join_run(cfg: RunConfig, plan: Plan, store: Store, live: dict, notice: PreemptionNotice) -> Supervisor:
    """A rank started again while its elastic run trains: set up with the stage's layers as the
    run has them, then join (run.elastic)."""
    plan = replace(plan, layers=range(*live["layers"][cfg.topology.stage]))
    trainer = Trainer(cfg, plan, None, None)
    if cfg.dp.replicated:  # set up before asking: the live ranks then pause only for the state's transfer
        trainer.setup(joining=True)
    supervisor = Supervisor(trainer, notice, ElasticController(trainer))
    try:
        supervisor.elastic.join(store, live)
    except RollBack as back:  # the run's state is not held whole by any replica: through its checkpoint
        return roll_back(supervisor, back)
    return supervisor


def stand_by(cfg: RunConfig, store: Store, notice: PreemptionNotice) -> Supervisor | None:
    """A spare (--spares): wait, loading nothing, until a regroup gives it a lost rank's slot;
    then set up as that slot's rank with the stage's layers as the run has them, and take the
    stage's state from a live replica (run.elastic). None: the run finished without it."""
    log.info("spare rank %d: waiting for a lost rank's place", cfg.spare_rank)
    taken = wait_as_spare(store, cfg.spare_rank, cfg.fingerprint(), cfg.comm.run_token, lambda: notice.pending)
    if taken is None:
        return None
    membership, stand_ins, live = taken
    slot = membership.slot_of(cfg.spare_rank)
    cfg = replace(cfg, topology=Topology(slot, cfg.topology.pipeline_size, cfg.topology.data_size))
    setup_logging(cfg.topology, cfg.log_level)  # the log's prefix names its place from now on
    plan = replace(plan_stage(cfg), layers=range(*live["layers"][cfg.topology.stage]))
    trainer = Trainer(cfg, plan, None, None)
    supervisor = Supervisor(trainer, notice, ElasticController(trainer))
    try:
        supervisor.joined_during = supervisor.elastic.stand_in(store, membership, stand_ins, live)
    except RollBack as back:  # no live replica holds the state of the stage it took
        return roll_back(supervisor, back)
    return supervisor


def roll_back(supervisor: Supervisor, back: RollBack) -> Supervisor:
    """The replicas changed and no live replica could hand over what the new generation needs (a
    spare in the only replica; ZeRO-1's shards, laid out anew for the new replica count): every
    rank of the new generation, a spare or joiner too, loads the last checkpoint they agree on
    (a rank whose folder lacks its part fetches it from one that has it, trainer.resume), in this
    process, and trains on from there. After a loss a metrics row says from which step to which,
    and how long it took."""
    old = supervisor.trainer
    comm = old.comm
    cfg = replace(old.cfg, checkpoint=replace(old.cfg.checkpoint, resume=True))
    # the survivors know the step they were in, whether progress was lost, and hold the takeover's
    # rows (a spare knows none of it)
    gathered = comm.all_gather_object((back.step, back.events, back.lost))
    lost_in, events, lost = max(gathered, key=lambda survivor: survivor[0])
    old.stage = old.optimizer = old.params = old.tied = None  # its memory, before the checkpoint's copy is built
    agree_on_resume(comm, cfg, old.plan.layers, old.disks)
    trainer = Trainer(cfg, old.plan, comm, old.disks)
    trainer.setup()
    elastic = ElasticController(trainer)
    elastic.layers_by_stage = supervisor.elastic.layers_by_stage
    took = time.perf_counter() - back.started
    trainer.state.events = events
    step = trainer.state.step
    if lost:
        log.warning("rolled back from step %d to checkpoint %d in %.2fs: no live replica held all of the state the "
                    "new replicas need", lost_in, step, took)  # fmt: skip
        trainer.state.events.append({"step": step, "event": "rolled back", "from_step": lost_in,
                                     "rollback_s": took, "unix_time": time.time()})  # fmt: skip
    else:
        log.info("every rank loaded checkpoint %d, laid out for %d replicas, in %.2fs", step,
                 trainer.topo.data_size, took)  # fmt: skip
    return Supervisor(trainer, supervisor.notice, elastic)

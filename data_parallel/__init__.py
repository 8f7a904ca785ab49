"""How a stage's gradients meet the other data-parallel replicas' gradients: one file per strategy
behind one interface (base.GradientSync), and the one the flags ask for (choose.make_sync).

    base.py        the interface the step calls; what the strategies share (fp16 unscaling, norms,
                   optimizer state by parameter name); StepsAlone for replicas that step alone
    allreduce.py   gradients summed after the step in one message (--dp-bucket-mb 0)
    buckets.py     gradients summed in buckets during the last backward (the default)
    compressed.py  --dp-compress: sums through a lossy codec with error feedback
    sharded.py     --shard-optimizer: ZeRO-1, optimizer state split over the replicas
    local_sgd.py   --dp-mode local: weights averaged every --sync-every steps
    diloco.py      --dp-mode diloco: DiLoCo's outer Nesterov step, streaming and overlapped
    flat.py        the flat layout of a stage's parameters and the norms measured on it
    config.py      DataParallelConfig and its flags

Imports comm/, modules/ and pipeline/ only; trainer/ builds the optimizer over what a strategy
says it steps (trainer.optimizer).
"""

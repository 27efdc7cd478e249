"""Training for the finetune and distill stages: one loop, options, optimizers, state, processes.

Single process: `effopt run recipe.yaml` trains in the runner's own process on its device.

Several processes on one host (multi-GPU): `effopt run recipe.yaml --nproc N`, or in the recipe
`distributed: {nproc: N, strategy: ddp|fsdp}` on a finetune/distill stage. Each training stage then
saves its input model (and teacher) and the token batches to a scratch folder and launches N
workers through torch.distributed's elastic agent (the engine behind `torchrun --standalone
--nproc_per_node N`): worker r uses cuda:r with NCCL on a GPU host (gloo on CPU), trains the same
job under DistributedDataParallel (strategy ddp) or FSDP2 `fully_shard` per decoder layer (fsdp:
parameters, gradients and optimizer state sharded; use it when a replica plus its optimizer state
does not fit one GPU), and rank 0 writes the trained model back for the runner; every other stage
runs once, in the runner. `batch_size` is the global batch per optimizer step (split over processes
and `grad_accum` micro-steps), so the same recipe computes the same update on 1 or N processes and
only runs faster. Run `effopt run` itself (not under torchrun); CUDA_VISIBLE_DEVICES picks the
GPUs; one host only (no multi-node). Training checkpoints (`checkpoint_every`) are written by rank 0
to run_dir/train_state/NN, and `effopt run ... --resume` (same recipe and --nproc) continues
mid-stage.
"""

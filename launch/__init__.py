"""Launching runs: the torch.distributed rendezvous from SLURM (`launch.env`) and the submitit
launcher with preemption-safe requeue (`launch.slurm`). Nothing is imported here, so importing
`launch.env` stays cheap."""

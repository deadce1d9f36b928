"""The whole run's config: one typed section per package, composed into `TrainConfig`."""

from pathlib import PurePath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from checkpoint.config import CheckpointConfig
from configs.base import Section
from data.config import DataConfig
from model.config import FlashVariant, ModelConfig
from monitor.config import DivergenceConfig, TelemetryConfig, WandbConfig
from optim.config import DeepSpeedConfig, OptimConfig


class RunConfig(Section):
    """Where a run lives, its seed and device, and how long its ranks wait for each other."""

    name: str = Field("default", min_length=1, description="run directory name under out_dir")
    out_dir: str = Field("runs", description="parent directory of run directories")
    seed: int = Field(1337, description="seeds init, data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when available, else cpu"
    )
    collective_timeout_s: float = Field(
        180.0,
        gt=0,
        description="seconds a rank waits in a collective (or the rendezvous) for a lost peer "
        "before failing; raise it if a large checkpoint's save or conversion takes longer",
    )
    lost_peer_s: float = Field(
        60.0,
        gt=0,
        description="with several ranks: a peer whose heartbeat stood still this long (at most "
        "half of collective_timeout_s) is named and the run recorded failed at once (NCCL aborts "
        "at the timeout without a word)",
    )
    move_aside: bool = Field(
        False,
        description="with checkpoint.resume=never: move an existing run to <name>.old-N first",
    )

    @field_validator("name")
    @classmethod
    def _inside_out_dir(cls, name: str) -> str:
        """A run directory outside out_dir would escape sweeps, reports and cleanup."""
        path = PurePath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(
                f"run.name {name!r} must be a plain relative path inside run.out_dir "
                "(no '..', no leading '/'); to write elsewhere set run.out_dir"
            )
        return name


class TrainLoopConfig(Section):
    max_steps: int = Field(300, ge=1, description="optimizer steps in the run")
    micro_batch_size: int = Field(16, ge=1, description="sequences per rank per micro-step")
    grad_accum_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="sequences per optimizer step over all ranks; set, it fixes the batch on "
        "any number of ranks and grad_accum_steps follows from it",
    )
    log_interval: int = Field(10, ge=1, description="steps between metrics.jsonl lines")
    eval_interval: int = Field(100, ge=0, description="steps between validation; 0 only at the end")
    compile: bool | None = Field(
        None, description="torch.compile the model; unset (null): on a GPU, off on a CPU"
    )
    ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="decay of an EMA of the weights updated every step, its val loss logged as "
        "val_loss_ema (the paper: 0.99); 0 = off",
    )

    def compiles(self, device_type: str) -> bool:
        """Whether the model is compiled on `device_type`: `compile` where set, else on CUDA
        only (measured on an H100: 465K tokens/s compiled against 309K eager; on a CPU the
        compile costs more than a short run gains)."""
        return self.compile if self.compile is not None else device_type == "cuda"


class TrainConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    precision: Literal["bf16", "fp32"] = Field(
        "fp32", description="bf16: autocast bf16 compute, fp32 weights and Adam state"
    )
    bf16_kernels: Literal["native", "emulated"] = Field(
        "native",
        description="with precision=bf16: native: the device's own bf16 autocast kernels; "
        "emulated: a GPU's tensor-core bf16 arithmetic in fp32 kernels, the same on every CPU "
        "(model/tensor_core.py)",
    )
    bf16_flash: FlashVariant = Field(
        "fa2",
        description="with bf16_kernels=emulated, flash attention's numerics (model/flash.py): "
        "fa2: a GPU's FlashAttention-2, delta from the bf16 O; fp32_delta: delta from the fp32 "
        "O; dynamic_max: Qiu & Yao's tie-avoiding row max; all_bf16: every intermediate in bf16 "
        "(their reference kernel, the aggressive bound)",
    )
    tf32: bool = Field(False, description="TF32 matmuls in fp32 (GPU only)")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        1,
        description="DeepSpeed ZeRO stage; left unset: 0 on one rank (a resume keeps the "
        "checkpoint's stage)",
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.run.move_aside and self.checkpoint.resume != "never":
            raise ValueError(
                "run.move_aside=true moves an old run aside to start afresh: it needs "
                "checkpoint.resume=never"
            )
        if self.bf16_kernels == "emulated" and self.precision != "bf16":
            raise ValueError(
                "bf16_kernels=emulated emulates bf16 arithmetic: it needs precision=bf16"
            )
        if self.bf16_flash != "fa2" and self.bf16_kernels != "emulated":
            raise ValueError(
                f"bf16_flash={self.bf16_flash} chooses the emulation's flash attention: it needs "
                "bf16_kernels=emulated (and precision=bf16)"
            )
        if self.optim.name == "adam_spd" and self.checkpoint.init_from is None:
            raise ValueError(
                "optim.name=adam_spd decays toward the starting weights of a fine-tune: set "
                "checkpoint.init_from to the checkpoint to start from"
            )
        return self

"""The live watch during training: divergence detectors and the policy that acts on them,
telemetry, Adam's sharpness and the slingshot signals, throughput, the run record and its sinks,
and which kernels the process runs (`device_path`). Post-mortem tools are in `postmortem/`."""

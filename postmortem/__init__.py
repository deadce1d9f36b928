"""After a run: why did it blow up? Tools that read a run directory and replay its checkpoints.

`python -m postmortem.replay` re-runs a detection's stretch from the checkpoint kept before it,
`python -m postmortem.diagnose` turns replays into a diagnosis (`postmortem.report` writes it,
`postmortem.signals` ranks the signals), and `python -m postmortem.kernel_path` measures what a
CPU kernel path changes. Nothing here runs during training; the live watch is `monitor/`.
"""

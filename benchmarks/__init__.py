"""tools/bench.py's parts, one module per thing it measures: timing.py (the harness: every case is timed there, with
the hardware references), training.py (+ peer.py, smp's Unet as a user trains it), memory.py (a spawned process per
case), inference.py, loading.py (data), estimate.py (how long a run will take), report.py (targets and tables). On its
own: checkpoint.py, what a checkpoint's checksums cost (`python -m benchmarks.checkpoint`, README "The run folder")."""

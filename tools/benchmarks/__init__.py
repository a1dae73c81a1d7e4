"""tools/bench.py's parts, one module per thing it measures: timing.py (the shared harness and the hardware
references), training.py (+ peer.py, smp's Unet as a user trains it), memory.py, inference.py, loading.py (data),
report.py (targets and tables)."""

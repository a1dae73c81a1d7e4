"""Run state, the training side of a run folder: where training stands (TrainState), atomic checkpoints and resume,
the run log, the refusal to overwrite another run, and the fault injection the tests kill runs with."""
from models.io import CheckpointError
from run_state.checkpoints import (STATE_NAME, TrainState, find_resume, load_extra, publish, read_checkpoint,
                                   save_checkpoint)
from run_state.faults import fault_point
from run_state.run_log import RunLog, refuse_overwrite, write_json_atomic, write_json_line

__all__ = ["STATE_NAME", "CheckpointError", "RunLog", "TrainState", "fault_point", "find_resume", "load_extra", "publish",
           "read_checkpoint", "refuse_overwrite", "save_checkpoint", "write_json_atomic", "write_json_line"]

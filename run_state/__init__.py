"""Run state, the training side of a run folder: where training stands (TrainState), atomic checkpoints with a
manifest of checksums, finding and verifying the one to resume from, the run log, write failures named, the refusal
to overwrite another run, and the fault injection the tests kill runs with."""
from models.io import CheckpointError
from run_state.checkpoints import STATE_NAME, TrainState, load_extra, publish, save_checkpoint
from run_state.faults import fault_point
from run_state.resume import find_resume, load_checkpoint, prepare_resume, read_checkpoint
from run_state.run_log import RunLog, refuse_overwrite, write_json_atomic, write_json_line
from run_state.writes import WriteError, write_text

__all__ = ["STATE_NAME", "CheckpointError", "RunLog", "TrainState", "WriteError", "fault_point", "find_resume",
           "load_checkpoint", "load_extra", "prepare_resume", "publish", "read_checkpoint", "refuse_overwrite",
           "save_checkpoint", "write_json_atomic", "write_json_line", "write_text"]

"""Model files (`model.safetensors` + `config.json`, the layout Accelerate's save_state uses) and atomic training checkpoints."""
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from models.model import ModelConfig, MultiDecoderModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, an exported folder or a run folder (its best, else last, checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last"):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} + {CONFIG_NAME} here or in checkpoints/best|last")


def load_state_dict(model: MultiDecoderModel, state: dict, source: Path) -> None:
    """Strict load that names the mismatching tensors instead of dumping every shape."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source}: weights do not fit the model {model.config} "
            f"({len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
            f"{len(wrong)} of another shape e.g. {wrong[:3]}). Was it trained with another "
            f"--encoder, number of classes or schedule?"
        )
    model.load_state_dict(state)


def load_model(path: str | Path, tasks: tuple[str, ...] | None = None) -> MultiDecoderModel:
    """Rebuild the model from config.json and load its weights (safetensors: no pickle)."""
    folder = resolve_checkpoint(path)
    config = ModelConfig.load(folder / CONFIG_NAME)
    model = MultiDecoderModel(config)
    load_state_dict(model, load_file(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)
    if tasks is not None:
        model = drop_decoders(model, tasks)
    return model.eval()


def drop_decoders(model: MultiDecoderModel, tasks: tuple[str, ...]) -> MultiDecoderModel:
    """A new model with only `tasks` (e.g. ("seg",) for deployment), sharing nothing with the input."""
    config = ModelConfig(**{**model.config.__dict__, "tasks": tuple(tasks)})
    slim = MultiDecoderModel(config)
    wanted = slim.state_dict().keys()
    slim.load_state_dict({k: v for k, v in model.state_dict().items() if k in wanted})
    return slim


def save_model(model: MultiDecoderModel, folder: str | Path) -> None:
    """Write weights and config (contiguous tensors, as safetensors requires)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_NAME)
    model.config.save(folder / CONFIG_NAME)


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint (registered with Accelerate and as JSON)."""

    stage: int = 0
    epoch: int = 0  # within the stage
    step: int = 0  # optimizer steps done within the epoch
    global_step: int = 0
    best_miou: float = -1.0
    steps_per_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def epoch_done(self) -> None:
        self.epoch, self.step = self.epoch + 1, 0

    def stage_done(self) -> None:
        self.stage, self.epoch, self.step = self.stage + 1, 0, 0


STATE_NAME = "train_state.json"


def fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself to disk before the rename that publishes it."""
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`; at every instant either the old or the new folder is complete on disk."""
    prev = final.with_name(final.name + ".prev")
    shutil.rmtree(prev, ignore_errors=True)
    if final.exists():
        os.replace(final, prev)  # a kill here leaves `prev`, which find_resume falls back to
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)
    fsync_tree(final.parent)


def save_checkpoint(accelerator, model, out: Path, state: TrainState, best: bool = False) -> None:
    """save_state into a temporary folder, then publish it as checkpoints/last (and copy it to best)."""
    ckpt = Path(out) / "checkpoints"
    tmp = ckpt / ".last.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main one the weights
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).config.save(tmp / CONFIG_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state.state_dict()))  # written last: marks it complete
        fsync_tree(tmp)
        publish(tmp, ckpt / "last")
        if best:
            shutil.copytree(ckpt / "last", ckpt / ".best.tmp", dirs_exist_ok=False)
            publish(ckpt / ".best.tmp", ckpt / "best")
    accelerator.wait_for_everyone()


def is_complete(folder: Path) -> bool:
    return (folder / STATE_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def find_resume(resume: str | None, out: Path) -> Path | None:
    """`auto`: the run folder's last checkpoint (or the one a kill mid-publish left), None if there is none."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(out) / "checkpoints" / "last"
        for candidate in (last, last.with_name("last.prev")):
            if is_complete(candidate):
                return candidate
        return None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (needs {STATE_NAME} and {WEIGHTS_NAME})")
    return path

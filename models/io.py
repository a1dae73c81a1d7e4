"""Model files: `model.safetensors` + `config.json` (the layout Accelerate's save_state uses) and the folder's
manifest (models/files.py), saved, verified and loaded."""
from pathlib import Path

from safetensors.torch import load_file, save_file

from models.files import CheckpointError, check, match_umask, write_manifest
from models.model import ModelConfig, MultiDecoderModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "check_shapes", "drop_decoders", "load_model",
           "load_state_dict", "resolve_checkpoint", "save_model"]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, an exported folder or a run folder (its best, else last, checkpoint)."""
    path = Path(path)
    ckpt = path / "checkpoints"
    # last.prev: what a kill between publish()'s two renames leaves
    for candidate in (path, ckpt / "best", ckpt / "last", ckpt / "last.prev"):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} + {CONFIG_NAME} here or in checkpoints/best|last")


def check_shapes(model: MultiDecoderModel, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Raise CheckpointError naming the mismatching tensors (a few of each kind) instead of dumping every shape."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    wrong = sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: weights do not fit the model {model.config} "
            f"({len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
            f"{len(wrong)} of another shape e.g. {wrong[:3]}). Was it trained with another "
            f"--encoder, number of classes or schedule?"
        )


def load_state_dict(model: MultiDecoderModel, state: dict, source: Path) -> None:
    """Strict load that names the mismatching tensors instead of dumping every shape."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state)


def load_model(path: str | Path, tasks: tuple[str, ...] | None = None) -> MultiDecoderModel:
    """Rebuild the model from config.json and load its weights (safetensors: no pickle), both verified against the
    folder's manifest first."""
    folder = resolve_checkpoint(path)
    check(folder, [WEIGHTS_NAME, CONFIG_NAME])
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
    """Write weights and config (contiguous tensors, as safetensors requires), then the folder's manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_NAME)
    match_umask(folder / WEIGHTS_NAME)
    model.config.save(folder / CONFIG_NAME)
    write_manifest(folder)

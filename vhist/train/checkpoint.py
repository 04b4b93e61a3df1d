"""Checkpoints written atomically, and the RNG state that makes a resume bit-for-bit."""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT_PREFIX = "vhist-train-"
FORMAT = FORMAT_PREFIX + "1"


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``
    (atomic on POSIX and Windows): a crash at any point leaves either the previous file
    or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CheckpointError(ValueError):
    """A file that is not a readable vhist training checkpoint of this format version."""


def _check_readable(path: Path) -> None:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a legacy pickle stream."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; use a last.pt or best.pt written by vhist train")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} is a damaged zip archive ({exc}); "
                                  "use a last.pt or best.pt written by vhist train") from None
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is damaged (entry {bad} fails its CRC check); "
                                  "use another last.pt or best.pt")
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        raise CheckpointError(f"checkpoint {path} is truncated or damaged (a zip archive without its central "
                              "directory); use another last.pt or best.pt")
    if head[:1] != b"\x80":  # every pickle protocol >= 2 starts with PROTO (0x80)
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint (neither a zip archive nor a pickle: "
                              f"truncated, or another kind of file); use a last.pt or best.pt written by vhist train")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Loads a vhist training checkpoint, validating it before anything is built from it.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable (truncated, not a torch file), not a vhist training
            checkpoint, or of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists()
                                else f"checkpoint {path} is a folder, not a file")
    _check_readable(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, AttributeError,
            ModuleNotFoundError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it is truncated or "
                              "damaged: use another last.pt or best.pt") from None
    found = state.get("format") if isinstance(state, dict) else None
    if not isinstance(found, str) or not found.startswith(FORMAT_PREFIX):
        raise CheckpointError(f"{path} is not a vhist training checkpoint (no '{FORMAT}' format tag); "
                              "vhist eval and --resume take the last.pt / best.pt of a vhist train run")
    if found != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {found!r}; this vhist reads {FORMAT!r}: "
                              "use the vhist version that wrote it")
    return state


def rng_state() -> dict:
    """Every global generator a training step can draw from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def selected_weights(state: dict) -> tuple[dict, str]:
    """The weights best-epoch selection chose, from a checkpoint: ``(state_dict, "ema")``
    when the run's best epoch was won by its weight EMA (``--ema``), else
    ``(state["model"], "raw")``. In a ``best.pt`` these are the weights that
    ``summary.json``'s test accuracy was measured with; the EMA module has the model's
    own keys, so either loads into a freshly built model."""
    which = (state.get("best") or {}).get("weights", "raw")
    if which == "ema" and state.get("ema") is not None:
        return state["ema"]["module"], "ema"
    return state["model"], "raw"


def build_model(state: dict) -> torch.nn.Module:
    """The model (zoo, or torchvision / timm converted) a loaded checkpoint trained (its model, classes and input size), with
    the weights best-epoch selection chose (:func:`selected_weights`)."""
    from vhist.convert.external import build

    model = build(state["train_config"]["model"], num_classes=state["num_classes"], image_size=state["image_size"])
    model.load_state_dict(selected_weights(state)[0])
    return model

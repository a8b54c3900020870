"""Device choice, seeding and the fast-mode workload switch."""
from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

FAST_ENV = "ADAPTIVE_KIT_FAST"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on: ``prefer`` if given, else CUDA when present, else CPU.

    Raises:
        ValueError: ``prefer`` names a device that does not exist here.
    """
    if prefer is not None:
        try:
            dev = torch.device(prefer)
        except RuntimeError as e:
            raise ValueError(f"pick_device(prefer={prefer!r}): not a device name") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"pick_device(prefer={prefer!r}): CUDA is not available here")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(
                    f"pick_device(prefer={prefer!r}): only {torch.cuda.device_count()} GPU(s)"
                )
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that runs repeat.

    Raises:
        ValueError: ``seed`` is not an integer in [0, 2**32).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything(seed={seed!r}): seed must be an int in [0, 2**32)")
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))  # also seeds every CUDA device


def fast_mode() -> bool:
    """True when ``ADAPTIVE_KIT_FAST`` asks for the small workloads that tests use.

    Raises:
        ValueError: the variable holds something other than a yes/no value.
    """
    raw = os.environ.get(FAST_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{FAST_ENV}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def budget(full: T, fast: T) -> T:
    """Pick a workload size: ``fast`` under ``ADAPTIVE_KIT_FAST=1``, otherwise ``full``.

    Every notebook sizes its runs through this one call, so that the tests run them small.
    """
    return fast if fast_mode() else full


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """A CPU generator for one worker's data draws: distinct per ``rank``, repeatable per ``seed``.

    Every capability that shards batches over ranks draws them from this, so that a simulated
    worker and the real rank ``rank`` see the same batches.
    """
    return torch.Generator().manual_seed(seed * 100_003 + rank)

"""What every backbone factory shares: the preset names, the hub settings read at call time, one clear error
when pretrained weights cannot be had, and seeding so a tiny preset always gets the same random weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import constants as hub_constants

from common.errors import ConfigError, ForgelabError

Preset = Literal["pretrained", "random", "tiny"]
PRESETS: tuple[str, ...] = ("pretrained", "random", "tiny")

# Seed for tiny presets: identical arguments must give identical weights in every process.
TINY_SEED = 0


class PretrainedUnavailableError(ForgelabError, RuntimeError):
    """Pretrained weights (or their config/tokenizer files) could not be loaded from the cache or the network."""


def check_preset(preset: str) -> None:
    """Fail early on a typo in a config (``preset: tinny``) rather than deep inside a library."""
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set now.

    huggingface_hub reads the variable once at import; reading it again here lets a caller (or a test) that sets
    it later still get ``local_files_only=True`` and no network attempt, which otherwise retries for a minute.
    """
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return hub_constants.HF_HUB_OFFLINE or any(
        (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub, else default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def hub_kwargs(model_id: str | None = None, revision: str | None = None) -> dict[str, object]:
    """``from_pretrained`` keyword arguments that honour the current cache and offline settings.

    ``revision`` (a branch, tag or commit) defaults to the registry's pinned revision of ``model_id``, if any.
    """
    from common.backbones.registry import default_revision

    kwargs: dict[str, object] = {"cache_dir": str(hub_cache_dir()), "local_files_only": hub_offline()}
    revision = revision or (default_revision(model_id) if model_id else None)
    if revision:
        kwargs["revision"] = revision
    return kwargs


def pretrained_unavailable(
    model_id: str, error: BaseException, repo_id: str | None = None
) -> PretrainedUnavailableError:
    """Build the one message a user needs when ``model_id`` cannot be loaded, whatever library failed.

    Library errors are long and name a URL or a missing config.json; the user needs to know whether they were
    offline, where the cache is, and the two ways forward (fetch the weights once, or run the tiny preset).
    ``repo_id`` is the hub repository to download when it differs from ``model_id`` (timm, open_clip names).
    """
    repo_id = repo_id or model_id
    reason = " ".join(str(error).split())
    if len(reason) > 300:
        reason = reason[:297] + "..."
    if hub_offline():
        network = "Offline mode is on (HF_HUB_OFFLINE=1), so only the local cache was searched."
    else:
        network = (
            "The Hugging Face Hub could not be reached or does not serve this id, and the cache lacks it."
        )
    cache_source = next(
        (var for var in ("HF_HUB_CACHE", "HF_HOME") if os.environ.get(var)), "default location"
    )
    return PretrainedUnavailableError(
        f"Cannot load pretrained weights for {model_id!r} ({type(error).__name__}: {reason})\n"
        f"{network}\n"
        f"Cache searched: {hub_cache_dir()} ({cache_source}; set HF_HOME to use another cache).\n"
        f"To fix: download it once on a machine with network access, e.g. `hf download {repo_id}` "
        f"(`huggingface-cli download {repo_id}` with older huggingface_hub), into that cache or one HF_HOME "
        f"points to. To run without the weights, use `preset: tiny` (same architecture class, small config, "
        f"random weights, fully offline)."
    )


def check_tokenizer_loaded(tokenizer: Any, vocab_size: int, model_id: str) -> None:
    """Reject the empty tokenizer transformers 5 returns, without an error, when the tokenizer files are missing.

    A real tokenizer covers (nearly) the text model's embedding table; the empty one has only its special tokens.
    """
    if len(tokenizer) * 2 < vocab_size:
        raise pretrained_unavailable(
            model_id,
            OSError(
                f"the tokenizer files are missing: got {len(tokenizer)} tokens for a {vocab_size}-token model"
            ),
        )


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Seed torch's global RNG for model construction, then restore the caller's RNG state.

    Module constructors draw their initial weights from the global generator; forking it makes a tiny preset
    deterministic without disturbing the seed the training run set.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield

"""Config helpers shared by the run logger (W&B config) and `forgelab compare` (config differences)."""

from __future__ import annotations

from typing import Any


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flat, readable keys for dashboards: `model.lr`, `model.class` (init_args/class_path folded away)."""
    flat: dict[str, Any] = {}
    if isinstance(config, dict):
        if "class_path" in config:
            flat[f"{prefix}class" if prefix else "class"] = str(config["class_path"]).rsplit(".", 1)[-1]
            flat.update(flatten_config(config.get("init_args") or {}, prefix))
            return flat
        for key, value in config.items():
            if key in ("config", "__path__", "print_config"):
                continue
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    if isinstance(config, list) and config and all(isinstance(v, dict) for v in config):
        for i, value in enumerate(config):
            flat.update(flatten_config(value, f"{prefix}{i}."))
        return flat
    key = prefix[:-1] if prefix.endswith(".") else prefix
    flat[key] = config if isinstance(config, (int, float, str, bool, type(None))) else str(config)
    return flat


_NOT_CONFIG = ("config", "__path__", "print_config")


def wandb_config(config: Any, exclude: set[str] | None = None, prefix: str = "") -> Any:
    """The config as W&B should hold it: nested exactly as jsonargparse names it (W&B shows `model.init_args.lr`,
    the key a sweep file uses), lists kept as lists, the CLI's own entries (`config`, `__path__`) dropped, and
    the dotted keys in ``exclude`` (a sweep's parameters, already in the run's config) left out."""
    exclude = exclude or set()
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            name = f"{prefix}{key}"
            if key in _NOT_CONFIG or name in exclude:
                continue
            out[key] = wandb_config(value, exclude, f"{name}.")
        return out
    if isinstance(config, (list, tuple)):
        return [wandb_config(value, exclude, f"{prefix}{i}.") for i, value in enumerate(config)]
    return config if isinstance(config, (int, float, str, bool, type(None))) else str(config)

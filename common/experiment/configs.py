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

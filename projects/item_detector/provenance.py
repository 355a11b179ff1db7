"""Where the frozen stage's features come from, beyond the config: the weights' revision, the library versions and
the extraction code itself. `FrozenStage.descriptor` puts all three into the feature cache's key, so a moved hub
`main`, a replaced local checkpoint, a library upgrade or an edited extraction module is a miss, not stale
features.

Weights are named by what is on disk, never by asking the network when offline:
  * a hub id: the snapshot folder the hub cache resolves it to (``refs/main`` -> ``snapshots/<commit>``); not
    cached and online: the commit the hub serves for ``main`` now (what the download will fetch); not cached and
    offline: ``None`` (the model cannot load either);
  * a local directory or checkpoint file: sha256 of the bytes of its files, remembered per (path, size, mtime)
    within the process (a 7.7 GB BLIP-2 takes seconds to hash).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name

from common.backbones.presets import hub_cache_dir, hub_offline

log = logging.getLogger("forgelab.item")

_REPO = Path(__file__).resolve().parents[2]

# The modules whose code decides what the frozen stage computes for an image: ITEM's captioning, grounding, CLIP
# and assembly, the model factories (tiny/random weights, tokenizers, dtypes), image decoding and perturbations.
EXTRACTION_SOURCES: tuple[str, ...] = (
    "projects/item_detector/frozen.py",
    "projects/item_detector/captioning.py",
    "projects/item_detector/grounding.py",
    "projects/item_detector/phrases.py",
    "projects/item_detector/clip_encoders.py",
    "common/backbones/transformers_models.py",
    "common/backbones/presets.py",
    "common/backbones/tokenizers.py",
    "common/data/images.py",
    "common/perturbations.py",
)

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered for the same (path, size, mtime) in this process."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        with open(path, "rb") as handle:
            _FILE_HASHES[memo] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _FILE_HASHES[memo]


def local_weights_fingerprint(path: str | Path) -> str:
    """sha256 over the bytes of a checkpoint file, or of every file under a directory (weights, config and
    tokenizer files alike: each changes the features), with their relative names."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):  # .cache/, .git/: not the model
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def cached_hub_revision(repo_id: str, revision: str = "main") -> str | None:
    """The commit the local hub cache resolves `revision` of `repo_id` to (its snapshot folder name), or None."""
    folder = hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = folder / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip() or None
    snapshots = folder / "snapshots"
    if (snapshots / revision).is_dir():  # a commit hash asked for directly
        return revision
    return None


@functools.lru_cache(maxsize=64)
def _served_hub_revision(repo_id: str, revision: str) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except Exception as err:  # any hub or network failure: the load will report it properly
        log.info("could not resolve the hub revision of %s: %s", repo_id, err)
        return None


def hub_revision(repo_id: str, revision: str = "main") -> str | None:
    """The snapshot commit of a hub id: the cached one, else (online only) the one the hub serves now."""
    cached = cached_hub_revision(repo_id, revision)
    if cached is not None or hub_offline():
        return cached
    return _served_hub_revision(repo_id, revision)


def weights_revision(model_id: str) -> str | None:
    """What names the weights of `model_id`: a local path's content hash, or a hub id's snapshot commit."""
    if Path(model_id).exists():
        return f"sha256:{local_weights_fingerprint(model_id)}"
    return hub_revision(model_id)


def open_clip_weights_revision(model_name: str, pretrained: str) -> str | None:
    """An open_clip weight tag's hub snapshot commit (or a checkpoint file's content hash)."""
    if Path(pretrained).exists():
        return f"sha256:{local_weights_fingerprint(pretrained)}"
    import open_clip

    repo_id = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", "").strip("/")
    return hub_revision(repo_id) if repo_id else None


def library_versions(open_clip: bool = False) -> dict[str, str | None]:
    """Versions of the libraries that compute the features (models, preprocessing, image decoding)."""
    names = {"transformers": "transformers", "Pillow": "pillow"}
    if open_clip:
        names["open_clip"] = "open_clip_torch"
    import torch

    versions: dict[str, str | None] = {"torch": torch.__version__}  # with its build tag (+cu130, +cpu)
    for label, distribution in names.items():
        try:
            versions[label] = package_version(distribution)
        except PackageNotFoundError:
            versions[label] = None
    return versions


def _code_of(source: str) -> str:
    """The module's code without docstrings, comments or formatting (editing those keeps the cache)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def source_fingerprint(paths: Sequence[str | Path] | None = None) -> str:
    """sha256 of the code of the extraction modules (`EXTRACTION_SOURCES`, relative to the repository)."""
    if paths is None:
        return _default_source_fingerprint()
    digest = hashlib.sha256()
    for path in paths:
        file = Path(path) if Path(path).is_absolute() else _REPO / path
        name = file.relative_to(_REPO).as_posix() if file.is_relative_to(_REPO) else file.name
        digest.update(f"{name}\0{_code_of(file.read_text())}\n".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _default_source_fingerprint() -> str:
    return source_fingerprint(EXTRACTION_SOURCES)

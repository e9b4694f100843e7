"""Reading and writing checkpoints in the official format (``config.json`` + ``pytorch_model.bin``).

Official files store every conv with weight norm, either as ``weight_g``/``weight_v`` (old
``torch.nn.utils.weight_norm``) or ``parametrizations.weight.original0``/``original1`` (its successor).
Both are folded here into one plain ``weight`` with the same kernel torch uses (``torch._weight_norm``),
so the folded weight is bit-identical to what the reference computes on every forward.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from ..config import BUNDLED_MODELS, HUB_IDS, SNACConfig

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "weights"
_KEY_STYLES = {
    "legacy": (".weight_g", ".weight_v"),
    "parametrizations": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the config it came with."""


def fold_weight_norm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Replace every (g, v) weight-norm pair, in either key style, by the plain ``weight`` it stands for."""
    folded: Dict[str, torch.Tensor] = {}
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in _KEY_STYLES.values():
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            folded[key] = value
    for prefix, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            missing = "magnitude (g)" if "g" not in pair else "direction (v)"
            raise CheckpointError(f"weight-norm parameters of {prefix!r} lack their {missing}")
        folded[prefix + ".weight"] = torch._weight_norm(pair["v"], pair["g"], 0)
    return folded


def unfold_weight_norm(model: nn.Module, key_style: str = "legacy") -> Dict[str, torch.Tensor]:
    """State dict with every conv weight split into weight-norm (g, v), as the official files store it."""
    if key_style not in _KEY_STYLES:
        raise ValueError(f"key_style must be one of {sorted(_KEY_STYLES)}, got {key_style!r}")
    g_suffix, v_suffix = _KEY_STYLES[key_style]
    conv_prefixes = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))}
    state: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and prefix in conv_prefixes:
            state[prefix + g_suffix] = torch.norm_except_dim(value, 2, 0).clone()
            state[prefix + v_suffix] = value.detach().clone()
        else:
            state[key] = value.detach().clone()
    return state


def read_config(directory: Path) -> SNACConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json (a SNAC checkpoint directory holds config.json "
                              f"and one of {', '.join(WEIGHT_FILES)})")
    return read_config_file(path)


def read_config_file(path: Path) -> SNACConfig:
    """A ``config.json`` (the reference constructor's keyword arguments) as a checked :class:`SNACConfig`."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object of SNAC constructor arguments")
    try:
        return SNACConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """Load a ``.bin`` (torch pickle, tensors only) or ``.safetensors`` weight file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for truncated or foreign files
        raise CheckpointError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def find_weights(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory} has config.json but no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached right now without waiting (offline mode, a host that does not resolve),
    or ``None`` when a download may be tried. Saves the client's retries, which take half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the files are not in the local cache"
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as exc:
        return f"this machine is offline or cannot resolve {host} ({exc})"
    return None


def _download(repo_id: str, kwargs: dict) -> Path:
    """Fetch config.json and a weight file of ``repo_id`` (or find them in the cache); their directory."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError  # type: ignore[no-redef]
    config_path = Path(hf_hub_download(repo_id, "config.json", **kwargs))
    offline_miss: Exception | None = None
    for filename in WEIGHT_FILES:
        try:
            hf_hub_download(repo_id, filename, **kwargs)
            return config_path.parent
        except LocalEntryNotFoundError as exc:  # not in the cache and no network: the file may still exist
            offline_miss = exc
        except EntryNotFoundError:
            continue
    if offline_miss is not None:
        raise offline_miss
    raise CheckpointError(f"hub repository {repo_id} has none of {', '.join(WEIGHT_FILES)}")


def resolve_hub(name: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Download (or find in the local cache) a hub checkpoint; return the directory holding its files.

    Without network access (``HF_HUB_OFFLINE=1``, or the hub's host does not resolve) only the local cache is
    read, and a miss fails at once with one line that says what to do.
    """
    repo_id = HUB_IDS.get(name.lower().removeprefix("snac_"), name)
    kwargs = {"revision": revision, "cache_dir": cache_dir}
    unreachable = _hub_unreachable()
    try:
        return _download(repo_id, {**kwargs, "local_files_only": unreachable is not None})
    except CheckpointError:
        raise
    except Exception as exc:  # offline, unknown repository, auth, ...
        reason = unreachable or f"{type(exc).__name__}: {exc}".rstrip(". ")
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub: {reason}. If this machine is offline, "
            f"download the model where the hub is reachable (hf download {repo_id} --local-dir DIR, or its "
            f"config.json and pytorch_model.bin) and load that directory: --model DIR or "
            f"SNAC.from_pretrained('DIR'); HF_HUB_OFFLINE=1 makes loading use only the local cache."
        ) from exc


def _check_name(name: str) -> None:
    """A name with no ``/`` that is neither a directory nor a preset is a typo, not a hub id: say so at once."""
    if "/" not in name and name.lower().removeprefix("snac_") not in HUB_IDS:
        raise CheckpointError(
            f"unknown model {name!r}: not a preset ({', '.join(HUB_IDS)}), a bundled model "
            f"({', '.join(BUNDLED_MODELS)}), a hub id (owner/name) or a checkpoint directory"
        )


def looks_like_path(name: str) -> bool:
    """True for names that cannot be hub ids (``owner/name`` or a preset), so a typo is not sent to the hub."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def locate(name_or_dir: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Tuple[SNACConfig, Path]:
    """Config and weight file for a local checkpoint directory, a bundled model (``mini``), a hub id, or a
    preset name (``24khz``)."""
    if str(name_or_dir).lower() in BUNDLED_MODELS:
        directory = BUNDLED_ROOT / str(name_or_dir).lower()
        return read_config(directory), find_weights(directory)
    path = Path(name_or_dir)
    if path.is_dir():
        return read_config(path), find_weights(path)
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory holding config.json and the weights")
    if looks_like_path(str(name_or_dir)):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    _check_name(str(name_or_dir))
    directory = resolve_hub(str(name_or_dir), revision=revision, cache_dir=cache_dir)
    return read_config(directory), find_weights(directory)

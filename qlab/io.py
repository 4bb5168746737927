"""Save and load quantized models: safetensors for tensors, JSON for what they mean. Never pickle.

One file holds everything. Its safetensors header carries, under the metadata key ``"qlab"``, a JSON
document::

    {"format": "qlab-quantized", "format_version": 1,
     "method": "rtn", "config": {...QuantConfig...} | null,
     "layers": {"model.layers.0.mlp.up_proj": {"type": "QuantLinear", "in_features": 576,
                "out_features": 1536, "mode": "weight", "spec": {...QuantSpec...},
                "weight_dtype": "float32", "bias": false, "input_scale": false}, ...},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"},   # tied tensors, stored once
     "extra_buffers": ["model.rotary_emb.inv_freq"],               # non-persistent buffers
     "embeddings": {"model.embed_tokens": {"padding_idx": null}},  # packed tables, if any
     "model": {"class": "LlamaForCausalLM", "config": {...}, "name": "smollm2-135m"} | absent}

and the tensors are the model's state dict (a :class:`~qlab.nn.QuantLinear` contributes its packed
``qweight``, ``scale``, ``zero``, ``bias`` and ``input_scale``), byte for byte. A packed embedding
(:class:`~qlab.nn.QuantEmbedding`, ``quantize_embeddings=True``) is its table's QuantLinear, described under
``"<name>.linear"``; a head tied to it is the same layer, stored once and re-tied as one module on load.

Loading builds the float model skeleton on the ``meta`` device (no memory for its float weights),
swaps in empty quantized layers as the JSON describes, checks every tensor's presence, shape and
dtype against that skeleton, then assigns the file's tensors: a quantized model loads in about its
quantized size. The only thing read from the file that names code is a transformers model class,
looked up by name among transformers' own ``PreTrainedModel`` classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlab.config import QuantConfig
from qlab.nn import LAYER_TYPES, QuantEmbedding
from qlab.tensor import dtype_name, parse_dtype

#: Version this qlab writes; files with a larger version are refused.
FORMAT_VERSION = 1
FORMAT_NAME = "qlab-quantized"
_META_KEY = "qlab"


class QuantizedFileError(ValueError):
    """A quantized model file that cannot be loaded, with the reason."""


def _parse_dtype(name: Any, what: str) -> torch.dtype:
    try:
        return parse_dtype(name, what)
    except ValueError as err:
        raise QuantizedFileError(str(err)) from err


def _is_quantized(mod: nn.Module) -> bool:
    return isinstance(mod, tuple(LAYER_TYPES.values()))


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: QuantConfig | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``model`` (quantized layers and float rest) to one ``.safetensors`` file; return its path.

    ``config`` (default: the one :func:`qlab.quantize_model` recorded on the model) and
    ``model_name`` (a :mod:`qlab.models` name, for the CLI) are stored in the JSON metadata. A
    transformers model also stores its class name and config so that :func:`load_quantized` can
    rebuild it without a factory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # A packed embedding (quantize_embeddings=True) is its table's QuantLinear (listed under
    # "<name>.linear" in "layers") plus what the wrapper adds; a head tied to it is the same layer,
    # and its tensors are stored once (aliases).
    embeddings = {
        n: {"padding_idx": m.padding_idx} for n, m in model.named_modules() if isinstance(m, QuantEmbedding)
    }
    layers = {
        n: m.layer_config()
        for n, m in model.named_modules(remove_duplicate=False)  # a shared layer is listed under each name
        if _is_quantized(m)
    }
    if config is None:
        config = getattr(model, "qlab_config", None)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(
                f"model: tensor {name} is on the meta device (not materialized); nothing to save"
            )
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in by_storage:  # tied weights: store once, remember the alias
            aliases[name] = by_storage[key]
            continue
        by_storage[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    extra: list[str] = []
    for name, buf in model.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if name in state or (_is_quantized(owner) and leaf in owner._non_persistent_buffers_set):
            continue  # in the state dict already, or derived from the layer's spec
        tensors[name] = buf.detach().cpu().contiguous()
        extra.append(name)
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": config.method if config is not None else None,
        "config": config.to_dict() if config is not None else None,
        "layers": layers,
        "aliases": aliases,
        "extra_buffers": extra,
    }
    if embeddings:
        meta["embeddings"] = embeddings
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        meta["model"] = {"class": type(model).__name__, "config": hf_config.to_dict()}
        if model_name is not None:
            meta["model"]["name"] = model_name
    elif model_name is not None:
        meta["model"] = {"name": model_name}
    path = Path(path)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta, default=str)})
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The qlab JSON metadata of a saved file, validated (format name and version)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except Exception as err:  # safetensors' own error types vary by version
        raise QuantizedFileError(
            f"{path}: not a readable safetensors file (truncated or corrupted header?): {err}"
        ) from err
    if raw is None:
        raise QuantizedFileError(f"{path}: no qlab metadata; not written by qlab.io.save_quantized")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise QuantizedFileError(f"{path}: the qlab metadata is not valid JSON (tampered?): {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise QuantizedFileError(f"{path}: metadata format is not {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise QuantizedFileError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise QuantizedFileError(
            f"{path}: format_version {version} is newer than this qlab reads ({FORMAT_VERSION}); upgrade qlab"
        )
    for key in ("layers", "aliases"):
        if not isinstance(meta.get(key), dict):
            raise QuantizedFileError(f"{path}: metadata field {key!r} is missing or not an object")
    if not isinstance(meta.get("extra_buffers", []), list):
        raise QuantizedFileError(f"{path}: metadata field 'extra_buffers' is not a list")
    embeddings = meta.get("embeddings", {})
    if not isinstance(embeddings, dict) or not all(
        isinstance(e, dict) and f"{n}.linear" in meta["layers"] for n, e in embeddings.items()
    ):
        raise QuantizedFileError(
            f"{path}: metadata field 'embeddings' must map each packed embedding to an object, with its "
            "table described under '<name>.linear' in 'layers'"
        )
    return meta


def _skeleton_layer(name: str, entry: dict[str, Any]) -> nn.Module:
    cls = LAYER_TYPES.get(entry.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise QuantizedFileError(
            f"layer {name}: unknown layer type {entry.get('type')!r}; expected one of {sorted(LAYER_TYPES)}"
        )
    try:
        return cls.from_layer_config(entry, device="meta")  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError) as err:
        raise QuantizedFileError(f"layer {name}: invalid layer description {entry!r}: {err}") from err


def _factory_from_metadata(meta: dict[str, Any]) -> Callable[[], nn.Module]:
    info = meta.get("model") or {}
    cls_name, cfg = info.get("class"), info.get("config")
    if not cls_name or not isinstance(cfg, dict):
        raise ValueError(
            "model_or_factory is required: the file records no transformers model class to rebuild"
        )
    import transformers

    cls = getattr(transformers, str(cls_name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise QuantizedFileError(f"model class {cls_name!r} is not a transformers PreTrainedModel")
    config_cls = cls.config_class
    config = config_cls.from_dict(cfg)

    def factory() -> nn.Module:
        return cls(config)

    return factory


def load_quantized(
    path: str | os.PathLike[str],
    model_or_factory: nn.Module | Callable[[], nn.Module] | None = None,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a model saved by :func:`save_quantized`.

    Args:
        path: the ``.safetensors`` file.
        model_or_factory: the float model to fill in, or a zero-argument callable building it (called
            on the meta device, so it should build from a config, not load weights). ``None``: rebuild
            the transformers model class recorded in the file.
        device: where the loaded tensors go.

    Raises:
        QuantizedFileError (a ValueError) naming the problem: unreadable/truncated file, tampered
        header, newer format version, missing or unexpected tensor, shape or dtype mismatch.
    """
    from safetensors import safe_open

    meta = read_metadata(path)
    if model_or_factory is None:
        model_or_factory = _factory_from_metadata(meta)
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    elif callable(model_or_factory):
        with torch.device("meta"):
            model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_or_factory returned {type(model).__name__}, not an nn.Module")
    else:
        raise TypeError(
            f"model_or_factory must be an nn.Module or a callable, got {type(model_or_factory).__name__}"
        )

    for name, info in meta.get("embeddings", {}).items():
        try:
            emb = model.get_submodule(name)
        except AttributeError as err:
            raise QuantizedFileError(f"embedding {name} in the file does not exist in the model") from err
        if not isinstance(emb, (nn.Embedding, QuantEmbedding)):
            raise QuantizedFileError(f"embedding {name}: the model has a {type(emb).__name__} there")
        table = _skeleton_layer(f"{name}.linear", meta["layers"][f"{name}.linear"])
        _set_module(model, name, QuantEmbedding(table, info.get("padding_idx")))  # type: ignore[arg-type]
    for name, entry in meta["layers"].items():
        if not isinstance(entry, dict):
            raise QuantizedFileError(f"layer {name}: description must be an object")
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise QuantizedFileError(f"layer {name} in the file does not exist in the model") from err
        _set_module(model, name, _skeleton_layer(name, entry))

    expected = model.state_dict()
    aliases: dict[str, str] = meta["aliases"]
    extra: list[str] = meta.get("extra_buffers", [])
    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            wanted = [k for k in expected if k not in aliases] + list(extra)
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise QuantizedFileError(
                    f"{path}: tensor {missing[0]!r} is missing from the file ({len(missing)} missing)"
                )
            unexpected = sorted(keys - set(wanted))
            if unexpected:
                raise QuantizedFileError(
                    f"{path}: tensor {unexpected[0]!r} in the file has no place in the model"
                )
            for k in wanted:
                t = f.get_tensor(k)
                if k in expected:
                    want = expected[k]
                    if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                        raise QuantizedFileError(
                            f"{path}: tensor {k!r} has shape {list(t.shape)} {dtype_name(t.dtype)}, "
                            f"the model expects {list(want.shape)} {dtype_name(want.dtype)}"
                        )
                loaded[k] = t
    except QuantizedFileError:
        raise
    except Exception as err:
        raise QuantizedFileError(
            f"{path}: cannot read tensors (truncated or corrupted file?): {err}"
        ) from err
    for name, target in aliases.items():
        if target not in loaded:
            raise QuantizedFileError(f"{path}: alias {name!r} points to {target!r}, which is not in the file")
        if name in expected and (expected[name].shape != loaded[target].shape):
            raise QuantizedFileError(f"{path}: alias {name!r} has the wrong shape for {target!r}")
        loaded[name] = loaded[target]
    state = {k: v for k, v in loaded.items() if k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    for name in extra:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, loaded[name])
    # Re-tie tensors the model shares (assign=True replaced them one by one).
    for name, target in aliases.items():
        _set_tensor(model, name, _get_tensor(model, target))
    # A quantized layer whose every tensor is an alias of another layer's (a head tied to a packed
    # embedding's table) becomes that same module again, as quantize_model left it.
    for name in meta["layers"]:
        keys = [k for k in expected if k.startswith(f"{name}.")]
        owners = {aliases[k][: -len(k) + len(name)] for k in keys if k in aliases}
        if keys and all(k in aliases for k in keys) and len(owners) == 1:
            (owner,) = owners
            if owner in meta["layers"] and all(aliases[k] == owner + k[len(name) :] for k in keys):
                _set_module(model, name, model.get_submodule(owner))
    for name, mod in model.named_modules():
        if _is_quantized(mod):
            mod.after_load()
            try:
                mod.check_finite(name)
            except ValueError as err:
                raise QuantizedFileError(f"{path}: {err}") from err
    leftover = [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"
    ]
    if leftover:
        raise QuantizedFileError(
            f"{path}: the model still has tensors on the meta device after loading: {leftover[:3]}"
        )
    if meta.get("config"):
        try:
            model.qlab_config = QuantConfig.from_dict(meta["config"])
        except (TypeError, ValueError):
            pass  # the config is informational; the layers carry their own specs
    if getattr(model, "qlab_config", None) is not None:
        from qlab.driver import AFTER_QUANTIZE

        for hook in AFTER_QUANTIZE:  # e.g. qlab.hf: save_pretrained writes a qlab checkpoint
            hook(model, model.qlab_config)
    model.eval()
    return model


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return getattr(owner, leaf)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(value, nn.Parameter) or leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    else:
        owner._buffers[leaf] = value


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)

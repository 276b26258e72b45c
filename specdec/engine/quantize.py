"""Int8 weights for a draft on the CPU: its Linear layers dynamically quantized.

A small draft's step on a CPU core is bound by reading its weights, not by the
arithmetic: the demo draft reads 13 MB of fp32 weights per forward (8 MB of it the
vocabulary projection) for 1-4 rows. Dynamic int8 quantization (``torch.ao``,
fbgemm/onednn kernels) stores those weights in a quarter of the bytes and quantizes
the activations on the fly; the demo draft's batched drafting for a verdict's
outcomes then takes 6.3 ms instead of 13.4 ms on one core.

The draft only proposes: the oracle verifies every token, so a draft's logits may
move a little without changing a single output token (only, slightly, which tokens
get accepted). Embeddings and norms stay as they are. CPU only: the kernels have no
CUDA version.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Sequence

import torch

from specdec.engine.models import LoadedModel, load_model

log = logging.getLogger(__name__)


def quantize_unsupported(loaded: LoadedModel) -> str | None:
    """Why ``loaded`` cannot take int8 weights here, or None when it can."""
    if loaded.device.type != "cpu":
        return f"int8 drafting runs on the CPU only, the draft is on {loaded.device}"
    if loaded.dtype != torch.float32:
        return f"int8 drafting quantizes float32 weights, the draft's are {loaded.dtype}"
    if "fbgemm" not in torch.backends.quantized.supported_engines and (
        "onednn" not in torch.backends.quantized.supported_engines
    ):
        return "this torch build has no quantized CPU engine (fbgemm, onednn)"
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return "this torch build has no torch.ao.quantization.quantize_dynamic"
    return None


def int8_weights(loaded: LoadedModel) -> LoadedModel:
    """A copy of ``loaded`` whose Linear layers hold int8 weights (``loaded`` is untouched).

    Raises ``ValueError`` with the reason when ``quantize_unsupported`` gives one.
    """
    reason = quantize_unsupported(loaded)
    if reason is not None:
        raise ValueError(reason)
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao announces its move to torchao
        warnings.simplefilter("ignore")
        model = quantize_dynamic(copy.deepcopy(loaded.model), {torch.nn.Linear}, torch.qint8)
    return dataclasses.replace(loaded, model=model)


def load_draft_model(source: str, device: str, dtype: str, quantize: str) -> LoadedModel:
    """A draft model loaded for drafting: int8 weights where ``quantize`` asks for them
    and they run (``auto``: where supported; ``int8``: warn where not; ``none``: never)."""
    model = load_model(source, device, dtype)
    if quantize == "none":
        return model
    reason = quantize_unsupported(model)
    if reason is None:
        log.info("drafting with int8 weights (quantize %s)", quantize)
        return int8_weights(model)
    level = logging.WARNING if quantize == "int8" else logging.INFO
    log.log(level, "drafting with %s weights, not int8: %s", model.dtype, reason)
    return model


def stacked_int8(modules: Sequence[torch.nn.Module]) -> torch.nn.Module | None:
    """One dynamic int8 Linear whose output is ``modules``' outputs side by side, with the
    very same int8 weights: each module's weight scale becomes the scale of its rows.

    Several projections of one input (q, k and v) then cost one call instead of three:
    on a CPU core a small draft's int8 matmul is mostly per-call overhead (the demo
    draft's q/k/v: 63 → 20 µs). Each layer quantizes the shared input to the same scale,
    so the outputs do not change. None unless they are all dynamic int8 Linear layers
    with per-tensor weights and this quantized engine takes per-row ones.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    layers = [m for m in modules if type(m) is DynamicLinear]
    if len(layers) != len(modules):
        return None
    weights = [m.weight() for m in layers]
    if any(w.qscheme() != torch.per_tensor_affine for w in weights):
        return None
    scales = [torch.full(w.shape[:1], w.q_scale(), dtype=torch.double) for w in weights]
    zeros = [torch.full(w.shape[:1], w.q_zero_point(), dtype=torch.long) for w in weights]
    # Dequantized k * scale, requantized with that same scale: k again.
    weight = torch.quantize_per_channel(
        torch.cat([w.dequantize() for w in weights]),
        torch.cat(scales),
        torch.cat(zeros),
        axis=0,
        dtype=torch.qint8,
    )
    biases = [m.bias() for m in layers]
    stacked = DynamicLinear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
    try:
        stacked.set_weight_bias(weight, None if biases[0] is None else torch.cat(biases))
    except RuntimeError as exc:  # a quantized engine without per-row int8 weights
        log.info("int8 projections stay separate: %s", exc)
        return None
    return stacked

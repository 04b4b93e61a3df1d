"""Static figures of the zoo's models (parameters, GMACs, BN layers, launches per
transformer block), shared by ``vhist models``, ``vhist report`` and the bench scripts."""
from __future__ import annotations


def model_stats(name: str, image_size: int | None = None) -> dict:
    """Parameters and GMACs (multiply-accumulates of the convs and matmuls, counted by
    ``torch.utils.flop_counter.FlopCounterMode``, MACs = FLOPs / 2) of one forward at batch
    1 with the torch backend, on fake CPU tensors: no weights are allocated, nothing runs."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import vhist

    # Built on the meta device (no init runs), then given fake CPU storage: some ops
    # (autocast checks) need a real device type, and fake tensors compute nothing.
    with torch.device("meta"):
        model = vhist.create_model(name, image_size=image_size).eval()
    size = image_size or vhist.models.model_config(name).image_size
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        # The math attention backend runs as matmuls, which the counter sees on CPU.
        with vhist.use_backend("torch"), sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
            model(torch.empty(1, 3, size, size))
    bn_layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {"model": name, "image_size": size, "params": sum(p.numel() for p in model.parameters()),
            "gmacs": counter.get_total_flops() / 2 / 1e9, "bn_layers": bn_layers,
            "prologue_pairs": vhist.models.prologue_pairs(model)}


def block_launches(name: str) -> tuple[int, int] | None:
    """(forward, backward) Triton launches of one transformer encoder block of model
    ``name`` in training on the triton backend, batch 1 at the default size, recorded
    instead of run (:func:`vhist.tools.launches.record_launches`; no GPU needed); None
    for a model without transformer blocks, or where launches cannot be recorded (a
    process under Triton's interpreter)."""
    import torch

    import vhist
    from vhist.kernels._config import INTERPRETED

    with torch.device("meta"):
        model = vhist.create_model(name)
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if layers is None or INTERPRETED:
        return None
    from vhist.tools.launches import record_launches

    block = layers[0].to_empty(device="cpu").train()
    tokens = model.encoder.pos_embedding.shape[1]
    x = torch.zeros(1, tokens, model.hidden_dim, requires_grad=True)
    with record_launches() as recorder, vhist.use_backend("triton"):
        y = block(x)
        forward = len(recorder.records)
        y.sum().backward()
    return forward, len(recorder.records) - forward


def default_image_size(model) -> int:
    """The paper's input size of a zoo model built by :func:`vhist.create_model`, as its
    registration records it (224 for a module not built by the registry)."""
    config = getattr(model, "default_config", None)
    return config.image_size if config is not None else 224

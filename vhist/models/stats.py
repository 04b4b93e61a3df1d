"""Static figures of the zoo's models (parameters, GMACs, BN layers), shared by
``vhist models``, ``vhist report`` and the bench scripts."""
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


def default_image_size(model) -> int:
    """The paper's input size of a zoo model built by :func:`vhist.create_model`, as its
    registration records it (224 for a module not built by the registry)."""
    config = getattr(model, "default_config", None)
    return config.image_size if config is not None else 224

"""A PyTorch comparison baseline for ``benchmarks.benchmark``: the BN-only training loop of the
blog post "Taking BatchNorm for granted", on a CIFAR ResNet shaped exactly like
``bn_jax.models.CifarResNet``.

Each step of the blog's loop is ``zero_grad``, forward, cross-entropy, ``backward``, SGD ``step``,
then ``model.apply(freeze_others)``, which sets ``requires_grad=False`` on the weight and bias of
every module that is not a BatchNorm. We keep its flaw on purpose, since that is the loop being
compared against: the freeze runs *after* the first optimizer step, so step 1 trains every
weight. From step 2 on the frozen weights get no gradient (``zero_grad`` left them ``None``), SGD
skips them, and autograd no longer computes their weight gradients, which is where the loop saves
time. Not part of the library: only the benchmark and the GPU check import this module, and torch
is imported lazily so that ``available()`` works without it.

Beside it, ``make_expert_runner`` is the loop a PyTorch expert would write for the same job,
the strongest PyTorch peer we know of: non-BN weights frozen once, before anything is compiled,
and an optimizer over the trainable parameters only; ``channels_last``; ``cudnn.benchmark``;
optional bfloat16 autocast; the uint8 training set resident on the device, with the shuffle,
random crop and flip done there as tensor ops; and, as variants, the whole step captured as one
CUDA graph (``graph``) or the model under ``torch.compile(mode="max-autotune")`` (``compile``).

``python -m benchmarks.torch_reference --model resnet20 --mode bn --steps 5`` prints images/s
(``--loop expert`` for the expert's loop).
"""

import argparse
import functools
import time

from bn_jax import models


def available() -> bool:
    """Whether torch imports (the benchmark skips the PyTorch rows otherwise)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def blocks_per_segment(model: str) -> int:
    """n for a "resnet<6n+2>" name, read as bn_jax reads it."""
    family, depth = models.parse_model_name(model)
    if family != "resnet":
        raise ValueError(f"unknown model {model!r}: the PyTorch reference only builds CIFAR ResNets "
                         "named resnet<6n+2> (resnet20, resnet56, resnet110, ...)")
    return models.blocks_per_segment(depth)


@functools.cache
def _classes():
    """The nn.Module classes, defined on first use so that importing this module needs no torch."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """conv3×3(stride)-BN-ReLU-conv3×3-BN plus a shortcut (1×1 conv + BN where the shape changes)."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.shortcut(x) + self.bn2(self.conv2(y)))

    class CifarResNet(nn.Module):
        """ResNet-(6n+2): stem, three segments of n blocks at 16w, 32w, 64w channels, pool, linear."""

        def __init__(self, n: int, width: int, num_classes: int):
            super().__init__()
            widths = [16 * width, 32 * width, 64 * width]
            self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(widths[0])
            blocks, cin = [], widths[0]
            for segment, cout in enumerate(widths):
                for i in range(n):
                    blocks.append(Block(cin, cout, 2 if segment > 0 and i == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(widths[-1], num_classes)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn(self.conv(x))))
            return self.fc(x.mean(dim=(2, 3)))

    return CifarResNet


def _init_open_lth(module) -> None:
    """open_lth's init, as bn_jax uses: Kaiming-normal conv/linear weights, BN γ ~ U[0, 1), β = 0.
    The linear bias keeps PyTorch's default, like bn_jax's head."""
    from torch import nn

    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.uniform_(module.weight, 0.0, 1.0)
        nn.init.zeros_(module.bias)


def build_resnet(model: str, width: int = 1, num_classes: int = 10):
    """A CIFAR ResNet with bn_jax's shapes (BN before ReLU; momentum 0.1, eps 1e-5 are PyTorch's
    defaults), initialised from torch's global RNG (seed it with ``torch.manual_seed``)."""
    n = blocks_per_segment(model)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    net = _classes()(n, width, num_classes)
    net.apply(_init_open_lth)
    return net


def bn_parameter_names(module) -> set:
    """Names (as in ``named_parameters``) of the BatchNorm parameters, the ones the blog trains."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return {f"{prefix}.{name}" if prefix else name
            for prefix, m in module.named_modules() if isinstance(m, _BatchNorm)
            for name, _ in m.named_parameters(recurse=False)}


def count_parameters(module, trainable_only: bool = False, bn_only: bool = False) -> int:
    """Parameter count; ``trainable_only`` keeps those with requires_grad, ``bn_only`` BatchNorm's."""
    bn = bn_parameter_names(module) if bn_only else None
    return sum(p.numel() for name, p in module.named_parameters()
               if (not trainable_only or p.requires_grad) and (bn is None or name in bn))


def freeze_others(module) -> None:
    """The blog's ``freezeOthers``: stop gradients to the weight and bias of a non-BatchNorm module."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if isinstance(module, _BatchNorm):
        return
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if param is not None:
            param.requires_grad_(False)


def make_runner(model: str, width: int, batch_size: int, mode: str, compile: bool = False,
                device: str | None = None, seed: int = 0, channels_last: bool = False):
    """``run(n)``: n steps of the blog loop on one fixed random batch already on the device, then a
    device sync; returns the last step's loss tensor (None for n = 0). ``run.model`` is the
    (uncompiled) network, whose parameters the steps update.

    mode "bn" freezes non-BN weights after every step as the blog does (so step 1 still trains
    them and step 2 is the first frozen one; under ``compile`` it also recompiles for the frozen
    graph, so warm up with at least 2 steps); mode "full" is the same loop without the freeze.
    The batch is N(0, 1) noise standing in for normalised images: no data loading in the loop.
    """
    import torch

    if mode not in ("bn", "full"):
        raise ValueError(f"mode must be 'bn' or 'full', got {mode!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    net = build_resnet(model, width).to(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    net.train()
    forward = torch.compile(net) if compile else net  # compiles lazily, on run's first step
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n: int):
        torch.backends.cudnn.benchmark = False  # PyTorch's default, which the blog keeps (a global: set per call)
        loss = None
        for _ in range(n):
            optimizer.zero_grad()
            loss = loss_fn(forward(images), labels)
            loss.backward()
            optimizer.step()
            if mode == "bn":
                net.apply(freeze_others)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return None if loss is None else loss.detach()

    run.model = net
    return run


PARAM_NAMES = {"Conv_0": "conv1", "BatchNorm_0": "bn1", "Conv_1": "conv2", "BatchNorm_1": "bn2",
               "Conv_2": "shortcut.0", "BatchNorm_2": "shortcut.1"}  # a bn_jax Block's layers → Block's


def torch_name(path) -> str:
    """The torch module name of a bn_jax CIFAR ResNet layer, e.g. ("Block_3", "Conv_1") → blocks.3.conv2."""
    if path[0].startswith("Block_"):
        return f"blocks.{path[0].split('_')[1]}.{PARAM_NAMES[path[1]]}"
    return {"Conv_0": "conv", "BatchNorm_0": "bn", "head": "fc"}[path[0]]


def load_bn_jax_variables(net, variables) -> None:
    """Copy a bn_jax CIFAR ResNet's ``params`` and ``batch_stats`` into ``net`` (same shapes:
    HWIO kernels → OIHW, (in, out) → (out, in)), so both frameworks start from the same function."""
    import numpy as np
    import torch
    import jax

    modules = dict(net.named_modules())
    names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            keys = [p.key for p in path]
            value = np.asarray(leaf, np.float32)
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
            target = getattr(modules[torch_name(keys[:-1])], names[keys[-1]])
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.array(value)))


def random_crop_flip(images, generator=None):
    """Pad by 4 with zeros, crop a random 32×32 window and flip half the images left-right, all
    as tensor ops on the images' device (NCHW; static shapes, so a CUDA graph can hold them)."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy, dx = (torch.randint(0, 9, (n, 1), device=images.device, generator=generator) for _ in range(2))
    rows = dy + torch.arange(h, device=images.device)
    cols = dx + torch.arange(w, device=images.device)
    flip = torch.rand(n, 1, device=images.device, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols)
    images = torch.gather(padded, 2, rows[:, None, :, None].expand(n, c, h, w + 8))
    return torch.gather(images, 3, cols[:, None, None, :].expand(n, c, h, w))


class ExpertStep:
    """One training step as an expert writes it: the frozen weights frozen once, before any step
    or compile, and SGD over the trainable parameters only (nothing computes or stores a frozen
    weight's gradient, from step 1 on)."""

    def __init__(self, net, mode: str, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 bfloat16: bool = False, compile: bool = False):
        import torch

        if mode not in ("bn", "full"):
            raise ValueError(f"mode must be 'bn' or 'full', got {mode!r}")
        if mode == "bn":
            net.apply(freeze_others)
        self.net, self.bfloat16 = net, bfloat16
        self.device_type = next(net.parameters()).device.type
        self.trainable = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.forward = torch.compile(net, mode="max-autotune") if compile else net
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def __call__(self, images, labels):
        """Train on a normalised float batch; the loss (a tensor, not synced)."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        # (no autocast weight cache: a CUDA graph must not capture a cast it would skip on replay)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bfloat16, cache_enabled=False):
            loss = self.loss_fn(self.forward(images).float(), labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def make_expert_runner(model: str, width: int, batch_size: int, mode: str, variant: str = "eager",
                       bfloat16: bool = False, device: str | None = None, seed: int = 0, steps_per_epoch: int = 4):
    """``run(n)`` as ``make_runner``'s, for the expert's loop: n steps on the device-resident
    uint8 training set (``steps_per_epoch`` batches of random images, shuffled on the device),
    each cropped, flipped and normalised there; then a sync. ``variant``: ``eager``, ``graph``
    (the whole step, data included, replayed as one CUDA graph; CUDA only) or ``compile``."""
    import torch

    if variant not in ("eager", "graph", "compile"):
        raise ValueError(f"variant must be eager, graph or compile, got {variant!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if variant == "graph" and device.type != "cuda":
        raise ValueError("a CUDA graph needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    net = build_resnet(model, width).to(device, memory_format=torch.channels_last).train()
    step = ExpertStep(net, mode, bfloat16=bfloat16, compile=variant == "compile")
    gen = torch.Generator().manual_seed(seed)
    n = batch_size * steps_per_epoch
    data = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen).to(device)
    targets = torch.randint(0, 10, (n,), generator=gen).to(device)
    mean = torch.tensor([125.3, 123.0, 113.9], device=device).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.1, 66.7], device=device).view(1, 3, 1, 1)
    index = torch.zeros(batch_size, dtype=torch.long, device=device)  # the batch's examples, set each step

    def one_step():
        images = data.index_select(0, index).permute(0, 3, 1, 2).float()
        images = ((random_crop_flip(images) - mean) / std).contiguous(memory_format=torch.channels_last)
        return step(images, targets.index_select(0, index))

    replay = one_step
    if variant == "graph":
        replay = _graphed(one_step, device)
    state = {"i": 0, "order": None}

    def run(k: int):
        torch.backends.cudnn.benchmark = True  # (a global: set per call, as rows of other loops interleave)
        loss = None
        for _ in range(k):
            i = state["i"] % steps_per_epoch
            if i == 0:
                state["order"] = torch.randperm(n, device=device)
            index.copy_(state["order"][i * batch_size:(i + 1) * batch_size])
            loss = replay()
            state["i"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return None if loss is None else loss.detach().clone()

    run.model = net
    return run


def _graphed(one_step, device):
    """``one_step`` captured as one CUDA graph after three warm-up steps on a side stream (as the
    PyTorch docs' whole-network capture does); calling the result replays it."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            one_step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = one_step()

    def replay():
        graph.replay()
        return static_loss
    return replay


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_reference", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet20", help="CIFAR ResNet, resnet<6n+2>")
    p.add_argument("--width", type=int, default=1, help="width multiplier")
    p.add_argument("--batch_size", type=int, default=128, help="images per step")
    p.add_argument("--mode", choices=("bn", "full"), default="bn",
                   help="bn: the blog's loop, freezing non-BN weights after each step; full: no freeze")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, the unfrozen step 1)")
    p.add_argument("--loop", choices=("blog", "expert"), default="blog",
                   help="blog: the blog's loop (freezing after each step); expert: frozen once, BN-only optimizer, "
                        "channels_last, data and augmentation on the device")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (blog: default mode; expert: mode max-autotune)")
    p.add_argument("--graph", action="store_true", help="expert loop: replay the whole step as one CUDA graph")
    p.add_argument("--bfloat16", action="store_true", help="expert loop: bfloat16 autocast")
    p.add_argument("--channels_last", action="store_true", help="blog loop: channels-last model and batch")
    p.add_argument("--device", default=None, help="torch device; cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the init and the random batch")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.loop == "blog" and (args.graph or args.bfloat16):
        parser.error("--graph and --bfloat16 are options of --loop expert")
    if args.loop == "expert":
        variant = "graph" if args.graph else "compile" if args.compile else "eager"
        run = make_expert_runner(args.model, args.width, args.batch_size, args.mode, variant, args.bfloat16,
                                 args.device, args.seed)
    else:
        run = make_runner(args.model, args.width, args.batch_size, args.mode, args.compile, args.device,
                          args.seed, args.channels_last)
    run(args.warmup)
    t = time.perf_counter()
    loss = run(args.steps)
    elapsed = time.perf_counter() - t
    print(f"{args.loop} loop, {args.model} ×{args.width} {args.mode}{' compiled' if args.compile else ''}"
          f"{' graph' if args.graph else ''}{' bfloat16' if args.bfloat16 else ''}, batch "
          f"{args.batch_size}: {args.batch_size * args.steps / elapsed:.0f} images/s, "
          f"{1000 * elapsed / args.steps:.1f} ms/step, loss {float(loss):.3f}")


if __name__ == "__main__":
    main()

"""CIFAR ResNets and VGGs as in the paper's code base (open_lth ``cifar_resnet``, ``cifar_vgg``),
plus a name registry.

Initialisation follows open_lth's defaults, which the paper used:
  * conv and dense kernels: Kaiming-normal, fan_in, gain sqrt(2), *not* truncated
    (``jax.nn.initializers.he_normal`` truncates, so we spell out ``variance_scaling``);
  * dense bias: PyTorch's default, Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in));
  * BatchNorm: γ ~ Uniform[0, 1) (open_lth's ``uniform`` BN init, the old PyTorch default) or
    γ = 1 (``ones``); β = 0.
BatchNorm momentum is PyTorch's 0.1 (Flax ``momentum=0.9``), epsilon 1e-5. Flax updates the
running variance with the biased batch variance where PyTorch uses the unbiased one; at batch
128 × 32 × 32 positions the difference is below 0.01%.

``dtype`` is the compute precision (``PRECISIONS``): with bfloat16, convolutions and the dense
layer run in bfloat16 while parameters stay float32 and Flax computes BatchNorm statistics
(and keeps the running ones) in float32; logits are returned as float32 for the loss.
"""

import functools
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax import names

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
names.check_keys(PRECISIONS, names.PRECISIONS, "models.PRECISIONS")

conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

BN_INITS = {
    "uniform": nn.initializers.uniform(scale=1.0),
    "ones": nn.initializers.ones,
}
names.check_keys(BN_INITS, names.BN_INITS, "models.BN_INITS")


def torch_linear_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def batch_norm(train: bool, bn_init: str = "uniform", affine: bool = True,
               dtype: Any = jnp.float32) -> Callable[..., nn.BatchNorm]:
    """BatchNorm as PyTorch/open_lth configure it (momentum 0.1, eps 1e-5).

    ``affine=False`` drops γ and β (PyTorch's ``affine=False``): the paper's Figure 1 ablation.
    """
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             use_scale=affine, use_bias=affine, dtype=dtype,
                             scale_init=BN_INITS[bn_init], bias_init=nn.initializers.zeros)


def bn_relu(x, norm, bn_before_relu: bool = True):
    """BatchNorm then ReLU (the paper's placement), or ReLU then BatchNorm."""
    return nn.relu(norm()(x)) if bn_before_relu else norm()(nn.relu(x))


def head(x, num_classes: int, dtype: Any = jnp.float32):
    """The output layer (a dense layer, as train_modes finds it; "head" names it in reports); float32 logits."""
    return nn.Dense(num_classes, kernel_init=conv_init, bias_init=torch_linear_bias_init(x.shape[-1]),
                    dtype=dtype, name="head")(x).astype(jnp.float32)


class Network(nn.Module):
    """The fields every registry model takes (what ``create_model`` passes)."""

    depth: int
    width: int = 1
    num_classes: int = 10
    bn_init: str = "uniform"
    bn_before_relu: bool = True
    affine: bool = True
    dtype: Any = jnp.float32  # compute precision; parameters are always float32

    def norm(self, train: bool) -> Callable[..., nn.BatchNorm]:
        return batch_norm(train, self.bn_init, self.affine, self.dtype)


class Block(nn.Module):
    """A residual block: two 3×3 conv-BN pairs (He et al. 2016's basic block, torchvision's
    BasicBlock) or, with ``bottleneck``, 1×1, 3×3 (with the stride), 1×1 to 4× the features
    (torchvision's Bottleneck); the shortcut is a 1×1 conv + BN where the shape changes."""

    features: int
    stride: int
    norm: Callable
    bn_before_relu: bool = True
    dtype: Any = jnp.float32
    bottleneck: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
        act = functools.partial(bn_relu, norm=self.norm, bn_before_relu=self.bn_before_relu)
        out = 4 * self.features if self.bottleneck else self.features
        y = act(conv(self.features, (1, 1))(x)) if self.bottleneck else x
        y = act(conv(self.features, (3, 3), self.stride, padding=1)(y))
        y = self.norm()(conv(out, (1, 1) if self.bottleneck else (3, 3), padding=0 if self.bottleneck else 1)(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = self.norm()(conv(out, (1, 1), self.stride)(x))
        return nn.relu(x + y)


class CifarResNet(Network):
    """ResNet-(6n+2) for 32×32 inputs: three segments of n blocks at 16k, 32k, 64k channels."""


    @nn.compact
    def __call__(self, x, train: bool = False):
        n = blocks_per_segment(self.depth)
        norm = self.norm(train)
        x = nn.Conv(16 * self.width, (3, 3), padding=1, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype)(x)
        x = bn_relu(x, norm, self.bn_before_relu)
        for segment, features in enumerate(self.segment_widths()):
            for i in range(n):
                stride = 2 if segment > 0 and i == 0 else 1
                x = Block(features, stride, norm, self.bn_before_relu, self.dtype)(x)
        return head(jnp.mean(x, axis=(1, 2)), self.num_classes, self.dtype)

    def segment_widths(self) -> Sequence[int]:
        return [16 * self.width, 32 * self.width, 64 * self.width]


def blocks_per_segment(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


VGG_PLANS = {  # open_lth cifar_vgg plans: channels, "M" = 2×2 max-pool
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


class CifarVGG(Network):
    """open_lth ``cifar_vgg_<depth>``: 3×3 conv (with bias) → BN → ReLU stacks, max-pools, then a
    2×2 average pool and one dense layer from 512 (×width) features."""

    # The 4 max-pools and the last average pool leave 1×1 of a 32×32 image; of a smaller one they
    # leave no pixel, and the head would average nothing (NaN logits, silently).
    MIN_IMAGE_SIDE = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = self.norm(train)
        for spec in VGG_PLANS[self.depth]:
            if spec == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            fan_in = 9 * x.shape[-1]
            x = nn.Conv(spec * self.width, (3, 3), padding=1, kernel_init=conv_init,
                        bias_init=torch_linear_bias_init(fan_in), dtype=self.dtype)(x)
            x = bn_relu(x, norm, self.bn_before_relu)
        if min(x.shape[1:3]) < 2:
            raise ValueError(f"vgg{self.depth}: images too small, no pixel is left for the head "
                             f"(needs {self.MIN_IMAGE_SIDE}×{self.MIN_IMAGE_SIDE})")
        x = jnp.mean(nn.avg_pool(x, (2, 2), strides=(2, 2)), axis=(1, 2))  # 2×2 → 1×1 at 32×32 input
        return head(x, self.num_classes, self.dtype)


# He et al. 2016, Table 1 (18…152) and He et al. 2016b, "Identity Mappings" (200): blocks per stage,
# and whether the blocks are bottlenecks.
IMAGENET_PLANS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
                  101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True), 200: ((3, 24, 36, 3), True)}


class ImageNetResNet(Network):
    """ResNet-18/34/50/101/152/200 for ImageNet (He et al. 2016; torchvision layout): 7×7/2 stem, max-pool,
    four stages at 64·width … 512·width channels, global average pool, dense head."""

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = self.norm(train)
        blocks, bottleneck = IMAGENET_PLANS[self.depth]
        x = nn.Conv(64 * self.width, (7, 7), 2, padding=3, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype)(x)
        x = nn.max_pool(bn_relu(x, norm, self.bn_before_relu), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, n in enumerate(blocks):
            for i in range(n):
                x = Block(64 * 2**stage * self.width, 2 if stage > 0 and i == 0 else 1, norm,
                          self.bn_before_relu, self.dtype, bottleneck=bottleneck)(x)
        return head(jnp.mean(x, axis=(1, 2)), self.num_classes, self.dtype)


FAMILIES = {"resnet": CifarResNet, "vgg": CifarVGG, "imagenet_resnet": ImageNetResNet}
names.check_keys(FAMILIES, names.MODEL_FAMILIES, "models.FAMILIES")
_NAME = re.compile(r"(imagenet_resnet|resnet|vgg)(\d+)$")


def model_names() -> str:
    return ("resnet<6n+2> (e.g. resnet20, resnet56, resnet110, resnet866), vgg11, vgg13, vgg16, vgg19, "
            + ", ".join(f"imagenet_resnet{d}" for d in IMAGENET_PLANS))


class ModelName(NamedTuple):
    family: str  # "resnet" (CIFAR), "vgg" or "imagenet_resnet"
    depth: int


def family_of(name: str) -> Optional[str]:
    """The family a name belongs to by its form (``resnet21`` is a "resnet", if not a valid one),
    or None; ``parse_model_name`` then checks the depth."""
    match = _NAME.match(name.lower())
    return match.group(1) if match else None


def parse_model_name(name: str) -> ModelName:
    """The one reading of a registry name; raises ValueError with the accepted names."""
    family = family_of(name)
    if family is None:
        raise ValueError(f"unknown model {name!r}; known: {model_names()}")
    depth = int(_NAME.match(name.lower()).group(2))
    if family == "resnet":
        blocks_per_segment(depth)
    elif family == "vgg" and depth not in VGG_PLANS:
        raise ValueError(f"unknown VGG depth {depth}; known: {', '.join(f'vgg{d}' for d in VGG_PLANS)}")
    elif family == "imagenet_resnet" and depth not in IMAGENET_PLANS:
        raise ValueError(f"unknown ImageNet ResNet depth {depth}; known: {', '.join(map(str, IMAGENET_PLANS))}")
    return ModelName(family, depth)


def create_model(name: str, *, width: int = 1, num_classes: int = 10, bn_init: str = "uniform",
                 bn_before_relu: bool = True, affine: bool = True, precision: str = "float32") -> nn.Module:
    """Build a model from its registry name; raises ValueError with the accepted names."""
    family, depth = parse_model_name(name)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if bn_init not in BN_INITS:
        raise ValueError(f"unknown bn_init {bn_init!r}; known: {', '.join(BN_INITS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    cls = FAMILIES[family]
    return cls(depth=depth, width=width, num_classes=num_classes, bn_init=bn_init,
               bn_before_relu=bn_before_relu, affine=affine, dtype=PRECISIONS[precision])


def input_problem(name: str, image_shape) -> Optional[str]:
    """Why model ``name`` cannot take images of ``image_shape`` (too small for its poolings), or None."""
    side = getattr(FAMILIES[parse_model_name(name)[0]], "MIN_IMAGE_SIDE", 1)
    height, width = image_shape[:2]
    if min(height, width) >= side:
        return None
    return (f"--model {name} needs images of at least {side}×{side} pixels (its poolings would leave no pixel for "
            f"the head); these are {height}×{width}: pass larger images, or choose a ResNet (resnet<6n+2>)")


def init_variables(model: nn.Module, key, image_shape=(32, 32, 3)):
    """Parameters and batch_stats, a pure function of the key (frozen weights can be re-derived)."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(key, dummy)

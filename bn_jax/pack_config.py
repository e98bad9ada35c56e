"""Which runs may train together as one pack, and the command line that asks for one.

A pack trains K runs in one compiled step (``bn_jax.pack``): the members' train states are
stacked along a leading axis and ``jax.vmap`` maps the step over it. So every member must compile
to the same program: the same architecture, batch size, epochs, schedule kind, train mode, data
and precision. They may differ only in what ``VARIES`` names, which change values and never
shapes. The train mode is shared for a reason beyond shapes too: a BN-only step skips the
convolutions that would compute the frozen weights' gradients, and a pack is one program, so a
BN-only member packed with a full member would pay for the full member's weight gradients.

This module imports no JAX, so that the command line refuses a bad pack before it starts JAX.
"""

import dataclasses
import itertools
from typing import Dict, List, Optional, Sequence

from bn_jax import config as config_lib
from bn_jax.config import param

# What members of a pack may differ in: seeds (the weights', and the data order's and
# augmentation's), and settings that the optimizer or the initial values take as numbers.
VARIES = ("seed", "init_seed", "lr", "weight_decay", "momentum", "warmup_epochs", "bn_init")
# Of those, the ones --vary sets (the seeds have their own flags).
VARY_FLAGS = ("lr", "weight_decay", "momentum", "warmup_epochs", "bn_init")
NO_EXTEND = ("--extend_to_epochs continues one run: extend each member alone (--seed S --workdir "
             "<its folder> --extend_to_epochs N)")


@dataclasses.dataclass
class PackOptions(config_lib._Part):
    seeds: Optional[str] = param(None, "train these seeds as one pack, one compiled step for all of them: a "
                                 "list and ranges such as 0,1,2 or 0-7 or 0-3,8. Each member is an ordinary run "
                                 "in <workdir>/<run name> (workdir default: runs); see docs/packs.md",
                                 group="packs", metavar="LIST")
    vary: Optional[List[str]] = param(None, "pack members for each of these values too (repeatable, e.g. --vary "
                                      f"lr=0.05,0.1 --vary weight_decay=0,1e-4); one of {', '.join(VARY_FLAGS)}",
                                      group="packs", metavar="FIELD=V1,V2", append=True)
    share_init: bool = param(False, "the members start from the weights of the first seed (--init_seed), while "
                             "each keeps its own data order and augmentation; frozen weights are then shared, "
                             "and each convolution runs once over all members' batches", group="packs")
    pack_members: str = param("auto", "how one compiled step trains the members: vmap maps the step over them "
                              "(members with their own frozen weights then run grouped convolutions); sequential "
                              "runs their steps one after another in the same program; auto: vmap, except on a CPU, "
                              "where XLA runs the mapped convolutions slowly. Both give the same results up to float "
                              "rounding", choices=("auto", "vmap", "sequential"), group="packs")
    device_memory_gb: Optional[float] = param(None, "refuse a pack whose compiled step needs more device memory "
                                              "than this (default: the limit the device reports; CPUs report "
                                              "none)", config_lib.at_least(0.0), group="packs")

    @property
    def packed(self) -> bool:
        return self.seeds is not None or bool(self.vary)

    def validate(self) -> "PackOptions":
        config_lib.check_fields(self)
        if self.seeds is not None:
            parse_seeds(self.seeds)
        for spec in self.vary or ():
            parse_vary(spec)
        if self.share_init and not self.packed:
            raise ValueError("--share_init applies to a pack: give --seeds (or --vary)")
        return self


def parse_seeds(text: str) -> List[int]:
    """``"0-3,8"`` → [0, 1, 2, 3, 8]; ValueError (one line) for a malformed or repeated seed."""
    seeds: List[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {part.strip()!r} is neither a seed nor a range A-B") from None
        if first > last:
            raise ValueError(f"--seeds {text!r}: the range {part.strip()} runs backwards")
        seeds += range(first, last + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds {text!r} names seed {repeated[0]} twice")
    bad = next((s for s in seeds if not 0 <= s <= config_lib.MAX_SEED), None)
    if bad is not None:
        raise ValueError(f"--seeds: seed {bad} is outside 0…{config_lib.MAX_SEED}")
    return seeds


def parse_vary(spec: str):
    """``"lr=0.05,0.1"`` → ("lr", [0.05, 0.1]), typed as the field is."""
    name, eq, values = spec.partition("=")
    if not eq or not values:
        raise ValueError(f"--vary {spec!r}: write FIELD=V1,V2")
    if name not in VARY_FLAGS:
        raise ValueError(f"--vary {name}: pack members may differ only in {', '.join(VARY_FLAGS)} "
                         "(and their seeds); other fields change the compiled program")
    kind = {f.name: f.type for f in dataclasses.fields(config_lib.ExperimentConfig)}[name]
    try:
        parsed = [kind(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--vary {spec!r}: not a list of {kind.__name__} values") from None
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"--vary {spec!r} repeats a value")
    return name, parsed


def members(base: config_lib.ExperimentConfig, options: PackOptions) -> List[config_lib.ExperimentConfig]:
    """The pack's experiments: every seed for every combination of the --vary values, validated."""
    seeds = parse_seeds(options.seeds) if options.seeds is not None else [base.seed]
    axes: Dict[str, Sequence] = dict(parse_vary(spec) for spec in options.vary or ())
    init = {"init_seed": base.init_seed if base.init_seed is not None else seeds[0]} if options.share_init else {}
    out = []
    for values in itertools.product(*axes.values()):
        for seed in seeds:
            out.append(dataclasses.replace(base, seed=seed, **dict(zip(axes, values)), **init).validate())
    check_pack(out)
    return out


def check_pack(configs: Sequence[config_lib.ExperimentConfig]) -> None:
    """ValueError naming the first field, outside ``VARIES``, in which the members differ, or the
    first experiment named twice; also refuses what one program cannot hold."""
    if not configs:
        raise ValueError("a pack needs at least one member")
    first = configs[0].to_dict()
    for config in configs[1:]:
        field = next((k for k, v in config.to_dict().items() if k not in VARIES and v != first[k]), None)
        if field is not None:
            raise ValueError(f"pack members differ in {field} ({first[field]!r} and {getattr(config, field)!r}); "
                             f"they may differ only in {', '.join(VARIES)}")
    names = [config_lib.run_name(c) for c in configs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ValueError(f"the pack holds the run {twice} twice")
    with_momentum = {c.momentum > 0 for c in configs}
    if len(with_momentum) > 1:
        raise ValueError("pack members differ in momentum 0 and > 0: plain SGD keeps no momentum buffer, so "
                         "their optimizer states differ in shape; pack them apart")
    if configs[0].to_dict()["dataset"] in config_lib.dataset_registry.STREAMED:
        raise ValueError(f"packs train datasets held on the device; {configs[0].dataset} is streamed")

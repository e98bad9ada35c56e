"""The input-pipeline report of ``python -m benchmarks.benchmark --input_pipeline DIR|generate``.

Streamed ImageNet input (``bn_jax.streaming``: decode, RandomResizedCrop, flip) timed in this
process and in grain worker processes, per CPU core; whether it keeps up with the BN-only
ImageNet ResNet step timed on this device; and an estimate (never a measurement) of the CPU
cores an H100 would need. The flags are ``benchmarks.benchmark``'s (its "input pipeline" group).
"""

import os
import statistics
import time
from typing import Dict, List, Optional

from tqdm import tqdm

from benchmarks.report import report_header, split, time_rounds, unwritable, write_report

# H100 SXM dense peaks without sparsity (NVIDIA's datasheet), FLOP/s: what the core estimate uses.
# float32 convolutions run as TF32 on the tensor cores by default in XLA:GPU.
H100_PEAKS = {"bfloat16": 989e12, "tf32": 495e12}
# Generated JPEGs: width and height drawn uniformly from these ranges (mean 400×350, ImageNet's
# typical training image), noise at these (cell size in pixels, amplitude) scales, and quality 95:
# about 110 KB per file, as ImageNet's training set averages.
GENERATED_WIDTH, GENERATED_HEIGHT = (300, 500), (250, 450)
GENERATED_OCTAVES = ((64, 50.0), (16, 35.0), (4, 35.0), (2, 25.0))
GENERATED_GRAIN, GENERATED_QUALITY = 10.0, 95


def input_workers(value: str) -> List[int]:
    """--input_workers: distinct worker counts in the order given; ``cores`` is os.cpu_count()."""
    out = []
    for v in split(value):
        if not (v == "cores" or v.isdigit()):
            raise ValueError(f"--input_workers takes comma-separated counts >= 0 or 'cores', got {value!r}")
        n = (os.cpu_count() or 1) if v == "cores" else int(v)
        out += [] if n in out else [n]
    if not out:
        raise ValueError("--input_workers: no worker count given")
    return out


def input_config(args, precision: str):
    """The BN-only ImageNet experiment whose step the report times (validated)."""
    from bn_jax.config import ExperimentConfig, imagenet_model_name
    return ExperimentConfig(model=imagenet_model_name(args.input_model), dataset="imagenet2012",
                            normalize="imagenet", train_mode="bn", batch_size=args.input_batch_size,
                            image_size=args.input_image_size, precision=precision).validate()


def input_problem(args) -> Optional[str]:
    """The first problem with the input-pipeline flags, or None (before anything is written or timed)."""
    try:
        workers = input_workers(args.input_workers)
        for precision in split(args.precisions):
            input_config(args, precision)
    except (ValueError, KeyError) as e:
        return str(e)
    if args.input_batches is not None and args.input_batches < in_flight_batches(max(workers)):
        return (f"--input_batches {args.input_batches} is fewer than the {in_flight_batches(max(workers))} batches "
                f"grain holds in flight with {max(workers)} workers: a round would time batches decoded before it")
    if not 0 < args.h100_mfu <= 1:
        return f"--h100_mfu must be in (0, 1], got {args.h100_mfu}"
    if args.input_pipeline == "generate" and args.generate_images < args.input_batch_size:
        return f"--generate_images {args.generate_images} is fewer than one batch (--input_batch_size)"
    return unwritable(args.out)


def synthetic_photo(rng):
    """A random RGB image whose JPEG is as large as a photo's: noise at four scales, each upscaled
    bicubically, plus fine grain. Plain noise would compress far worse and a flat image far better,
    and decoding time grows with the compressed size."""
    import numpy as np
    from PIL import Image
    w, h = int(rng.integers(*GENERATED_WIDTH, endpoint=True)), int(rng.integers(*GENERATED_HEIGHT, endpoint=True))
    image = np.full((h, w, 3), 128.0, np.float32)
    for cell, amplitude in GENERATED_OCTAVES:
        low = rng.normal(0, amplitude, (max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        image += np.stack([np.asarray(Image.fromarray(low[..., c], mode="F").resize((w, h), Image.BICUBIC))
                           for c in range(3)], -1)
    image += rng.normal(0, GENERATED_GRAIN, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def generate_imagenet_folder(root: str, n: int, seed: int = 0, classes: int = 8) -> str:
    """An ImageNet-layout folder of ``n`` synthetic training JPEGs over up to ``classes`` classes
    (and one validation image each, which the layout check requires)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    wnids = [f"n{i:08d}" for i in range(max(1, min(classes, n)))]
    files = [("train", wnids[i % len(wnids)], i) for i in range(n)] + [("val", w, 0) for w in wnids]
    for split_name, wnid, i in tqdm(files, desc="generating JPEGs", leave=False):
        os.makedirs(os.path.join(root, split_name, wnid), exist_ok=True)
        synthetic_photo(rng).save(os.path.join(root, split_name, wnid, f"{wnid}_{i}.JPEG"), "JPEG",
                                  quality=GENERATED_QUALITY)
    return root


def describe_files(paths: List[str], sample: int = 1000) -> Dict:
    """Mean file size and pixel size of (a fixed random sample of) the training images, from
    their headers: what the per-core rate depends on, so the report states it."""
    import numpy as np
    from PIL import Image
    def size(path):
        with Image.open(path) as image:  # (reads the header only)
            return image.size

    chosen = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:sample]]
    sizes = [size(p) for p in chosen]
    return {"files": len(paths), "sampled": len(chosen),
            "mean_kb": float(np.mean([os.path.getsize(p) for p in chosen])) / 1000,
            "mean_width": float(np.mean([w for w, _ in sizes])), "mean_height": float(np.mean([h for _, h in sizes]))}


def process_tree_cpu() -> Dict[int, float]:
    """CPU seconds (user + system) so far of this process and of each descendant (grain's
    workers), by pid: worker processes are alive while they work, so ``os.times`` (which counts
    waited-for children only) cannot see them."""
    import psutil
    me, out = psutil.Process(), {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:  # (it ended meanwhile)
            pass
    return out


def cpu_seconds_since(before: Dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in process_tree_cpu().items())


def in_flight_batches(workers: int) -> int:
    """Batches grain can have in flight while the consumer waits: each reading process's read-ahead
    (this one, or each worker: bn_jax.streaming.read_options) plus the workers' output buffers.
    They all start with the iterator, so the first batches arrive in a burst, and later ones in
    smaller bursts: a round must span many batches more than this."""
    from bn_jax import streaming
    per_process = streaming.read_options(workers).prefetch_buffer_size
    return per_process * max(1, workers) + streaming.PER_WORKER_BUFFER * workers


def time_pipeline(data, workers: int, batch_size: int, batches: Optional[int], rounds: int) -> Dict:
    """Images/s and CPU seconds of bn_jax.streaming's training pipeline (decode, RandomResizedCrop,
    flip, batch) with ``workers`` processes, in ``rounds`` rounds of ``batches`` host batches
    (None: 10× ``in_flight_batches``, so that the work in flight at a round's ends is small beside it).

    Untimed first: the workers' start and the start-up burst (``in_flight_batches``), so that
    rounds measure the steady stream. Rounds of one configuration run back to back, not
    interleaved with the others': an idle iterator keeps decoding, and a round after a pause would
    be handed batches made off its clock. Images/s is the median round's. Workers may decode ahead
    of what they hand over (each buffers up to grain's read-ahead); the stream ends with the last
    round, which then delivers what was decoded ahead and can come out fast (the median ignores
    it). The per-core rate is all rounds' images over all their CPU seconds (every process of the
    pipeline): work decoded ahead is counted, and none is spent past the stream's end.
    """
    from bn_jax import streaming
    skip = in_flight_batches(workers) + 1
    batches = batches or 10 * in_flight_batches(workers)
    total = skip + batches * rounds
    epochs = -(-total * batch_size // (data.num_train // batch_size * batch_size))
    it = streaming.iterate(streaming.train_dataset(data, 0, batch_size, epochs, augment=True)[:total], workers)
    seconds, cpu = [], []
    try:
        for _ in tqdm(range(skip), desc=f"input, {workers} workers: warm-up", leave=False):
            next(it)
        for _ in tqdm(range(rounds), desc=f"input, {workers} workers", leave=False):
            before, start = process_tree_cpu(), time.perf_counter()
            for _ in range(batches):
                next(it)
            seconds.append(time.perf_counter() - start)
            cpu.append(cpu_seconds_since(before))
    finally:
        streaming.close(it)
    images = batches * batch_size
    return {"workers": workers, "warmup_batches": skip, "images_per_round": images,
            "images_per_second": statistics.median(images / s for s in seconds),
            "cores_busy": sum(cpu) / sum(seconds), "images_per_core_second": images * rounds / max(sum(cpu), 1e-9),
            "seconds_rounds": seconds, "cpu_seconds_rounds": cpu}


def step_runner(config, data):
    """The streamed trainer's step (bn_jax.program's StreamingProgram, one device), compiled ahead
    of time on the pipeline's first batch: (run(n): n steps then wait, XLA's cost of one step)."""
    import jax
    from bn_jax import imagenet, parallel, roofline, streaming, train
    from bn_jax import program as program_lib
    from bn_jax.config import RuntimeConfig

    program = program_lib.build_program(config, RuntimeConfig(workers=0), data, parallel.make_mesh(1))
    size = config.image_size
    state = program.put(train.create_train_state(config, imagenet.NUM_CLASSES, (size, size, 3),
                                                 steps_per_epoch=program.steps_per_epoch))
    batch = streaming.train_dataset(data, config.seed, config.batch_size, 1, augment=True)[0]
    images, labels = (jax.device_put(batch[k], parallel.sharded(program.mesh)) for k in ("image", "label"))
    holder = {"state": state, "totals": program.zero_totals()}
    compiled, step = program.compile_step(holder["state"], holder["totals"], images, labels)
    program.close()

    def run(n: int):
        s, t = holder["state"], holder["totals"]
        for i in range(n):
            s, t = step(s, t, images, labels, i)
        jax.block_until_ready(s)
        holder["state"], holder["totals"] = s, t

    return run, roofline.step_cost(compiled)


def time_step(args, data, precision: str) -> Dict:
    """Images/s of the BN-only ImageNet ResNet step on this device (median of its timed rounds),
    and XLA's FLOPs per image of it (None where the convolutions are cuDNN calls, which XLA does
    not count)."""
    config = input_config(args, precision)
    t = time.perf_counter()
    run, cost = step_runner(config, data)
    run(max(1, args.warmup))
    ready_s = time.perf_counter() - t
    seconds = time_rounds({"step": run}, args.steps, args.rounds)["step"]
    per_step = statistics.median(seconds)
    return {"model": config.model, "train_mode": "bn", "batch_size": config.batch_size, "precision": precision,
            "image_size": config.image_size, "ms_per_step": 1000 * per_step,
            "images_per_second": config.batch_size / per_step, "ms_per_step_rounds": [1000 * x for x in seconds],
            "flops_per_image": None if cost["flops"] is None else cost["flops"] / config.batch_size,
            "ready_s": ready_s}


def keeps_up(pipeline: List[Dict], step_rows: List[Dict], platform_name: str) -> Dict:
    """Whether the pipeline with the most workers delivers the fastest timed step's images/s, and
    how many cores' worth of decoding that step consumes (its images/s over the per-core rate)."""
    full = max(pipeline, key=lambda r: r["workers"])
    step = max(step_rows, key=lambda r: r["images_per_second"])
    cores = os.cpu_count() or 1
    verdict = {"workers": full["workers"], "pipeline_images_per_second": full["images_per_second"],
               "step_images_per_second": step["images_per_second"], "step_precision": step["precision"],
               "ratio": full["images_per_second"] / step["images_per_second"],
               "cores_needed": step["images_per_second"] / full["images_per_core_second"], "cpu_count": cores,
               "shared_cores": platform_name == "cpu"}
    verdict["keeps_up"] = verdict["ratio"] >= 1
    verdict["note"] = (f"On this CPU the step and the input workers share the same {cores} cores, so in training "
                       "each slows the other: the decoding that feeds the step takes CPU time from it. They were "
                       "timed apart (the step with no workers running)." if verdict["shared_cores"] else
                       f"The step runs on the {platform_name}, the workers on the host's {cores} CPU cores.")
    return verdict


def h100_estimates(flops_per_image: Optional[float], images_per_core_second: float, mfu: float) -> List[Dict]:
    """ESTIMATED, never measured: the CPU cores an H100 training this BN-only step would need,
    its images/s (published dense peak × assumed utilisation ÷ XLA's FLOPs per image) over the
    measured per-core rate; one row per precision. None without a FLOP count."""
    if not flops_per_image:
        return []
    return [{"precision": precision, "peak_flops": peak, "assumed_mfu": mfu,
             "estimated_images_per_second": peak * mfu / flops_per_image,
             "estimated_cores": peak * mfu / flops_per_image / images_per_core_second}
            for precision, peak in H100_PEAKS.items()]


def _gflop(flops: Optional[float]) -> str:
    return f"{flops / 1e9:.2f}" if flops else "–"


def format_input_report(section: Dict) -> str:
    """benchmark.md's part for the input pipeline: the measured tables, the verdict, then the
    estimate under a heading that says it is one, and the assumptions."""
    src, k = section["source"], section["keeps_up"]
    lines = [f"Input: {src['kind']} ({src['path']}), {src['files']} training images (sampled {src['sampled']}: "
             f"mean {src['mean_kb']:.1f} KB, {src['mean_width']:.0f}×{src['mean_height']:.0f} px). Per image: "
             f"decode, {section['augment']}. Host batch {section['batch_size']}.", "",
             "| workers | batches per round | images/s | CPU cores busy | images/s per core |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers'] or '0 (in-process threads)'} | {r['images_per_round'] // section['batch_size']} | "
              f"{r['images_per_second']:.1f} | {r['cores_busy']:.2f} | {r['images_per_core_second']:.1f} |"
              for r in section["pipeline"]]
    lines += ["", "| BN-only step | batch | precision | ms/step | images/s | GFLOP/image (XLA) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['model']} {s['image_size']}² | {s['batch_size']} | {s['precision']} | {s['ms_per_step']:.1f} | "
              f"{s['images_per_second']:.2f} | {_gflop(s['flops_per_image'])} |" for s in section["step"]]
    lines += ["", f"**Keeps up: {'yes' if k['keeps_up'] else 'no'}.** {k['workers']} workers deliver "
              f"{k['pipeline_images_per_second']:.1f} images/s; the step ({k['step_precision']}) trains "
              f"{k['step_images_per_second']:.2f} images/s ({k['ratio']:.1f}×); decoding at the step's pace takes "
              f"{k['cores_needed']:.3g} of {k['cpu_count']} cores. {k['note']}"]
    if section["h100_estimate"]:
        lines += ["", "| H100 ESTIMATE (not measured) | peak TFLOP/s | assumed MFU | images/s | CPU cores needed |",
                  "|---|---|---|---|---|"]
        lines += [f"| {e['precision']} | {e['peak_flops'] / 1e12:.0f} | {100 * e['assumed_mfu']:.0f}% | "
                  f"{e['estimated_images_per_second']:.0f} | {e['estimated_cores']:.0f} |"
                  for e in section["h100_estimate"]]
    else:
        lines += ["", "No H100 estimate: XLA counted no FLOPs for this step (cuDNN convolutions); run on a CPU."]
    load = section["load_average"]
    lines += ["", f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load['before'])}; after: "
              f"{', '.join(f'{x:.2f}' for x in load['after'])}."]
    return "\n".join(lines + [""] + [f"- {a}" for a in section["assumptions"]])


def input_source(args, tmp: str):
    """(StreamData, what it is) for --input_pipeline: the folder given, or JPEGs generated in ``tmp``.
    A DataError names what is wrong with a folder."""
    from bn_jax import imagenet
    from bn_jax.datasets import DataError
    generated = args.input_pipeline == "generate"
    root = (generate_imagenet_folder(os.path.join(tmp, "imagenet"), args.generate_images) if generated
            else args.input_pipeline)
    data = imagenet.load(root, crop=args.input_image_size)
    if data.num_train < args.input_batch_size:
        raise DataError(f"{root}: {data.num_train} training images, fewer than one batch (--input_batch_size)")
    return data, {"kind": "generated JPEGs" if generated else "ImageNet folder",
                  "path": "a temporary folder, removed after" if generated else os.path.abspath(root),
                  **describe_files([path for path, _ in data.train.records])}


def input_assumptions(args, section: Dict) -> List[str]:
    """What the verdicts rest on, printed beside them."""
    per_core = max(section["pipeline"], key=lambda r: r["workers"])
    return [f"Per-core rate: images per CPU-second of every process of the pipeline (this one and its workers), "
            f"with {per_core['workers']} workers; the core estimate assumes it holds on any number of cores.",
            "Images are read from the page cache after the first pass: no disk or network time is counted.",
            f"H100 estimate: NVIDIA's published H100 SXM dense peak (bfloat16 {H100_PEAKS['bfloat16'] / 1e12:.0f}, "
            f"TF32 {H100_PEAKS['tf32'] / 1e12:.0f} TFLOP/s; float32 convolutions run as TF32) × an ASSUMED "
            f"{100 * args.h100_mfu:.0f}% utilisation ÷ XLA's FLOPs per image of the BN-only step (forward and input "
            "gradients; counted by XLA:CPU's cost analysis). No H100 was measured; the estimate scales with the "
            "assumed utilisation."]


def measure_input(args, data, source: Dict) -> Dict:
    """The input-pipeline report's measurements and verdicts (the pipeline first, then the step),
    with the machine's load average before and after: other processes slow the wall-clock rates
    (far less the per-core rate, which counts this pipeline's own CPU seconds)."""
    import jax
    workers = input_workers(args.input_workers)
    load_before = os.getloadavg()
    pipeline = [time_pipeline(data, w, args.input_batch_size, args.input_batches, args.rounds) for w in workers]
    for row in pipeline:
        tqdm.write(f"input, {row['workers']} workers: {row['images_per_second']:.1f} images/s, "
                   f"{row['images_per_core_second']:.1f} per core")
    step_rows = [time_step(args, data, precision) for precision in split(args.precisions)]
    full = max(pipeline, key=lambda r: r["workers"])
    flops = next((s["flops_per_image"] for s in step_rows if s["flops_per_image"]), None)
    section = {"source": source, "batch_size": args.input_batch_size, "image_size": args.input_image_size,
               "augment": f"RandomResizedCrop({args.input_image_size}, scale 0.1–1, ratio 0.8–1.25) + flip",
               "pipeline": pipeline, "step": step_rows,
               "keeps_up": keeps_up(pipeline, step_rows, jax.devices()[0].platform),
               "h100_estimate": h100_estimates(flops, full["images_per_core_second"], args.h100_mfu),
               "load_average": {"before": load_before, "after": os.getloadavg()}}
    section["assumptions"] = input_assumptions(args, section)
    return section


def input_main(parser, args, argv) -> None:
    """--input_pipeline: check the flags and the folder (exit 2 naming the problem), measure, and
    write benchmark.json and benchmark.md. A generated folder is removed whatever happens."""
    import shutil
    import tempfile
    from bn_jax.datasets import DataError
    problem = input_problem(args)
    if problem:
        parser.error(problem)
    tmp = tempfile.mkdtemp(prefix="bn_jax_input_")
    try:
        try:
            data, source = input_source(args, tmp)
        except DataError as e:
            parser.error(str(e))
        section = measure_input(args, data, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {**report_header(argv), "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
              "input_batches": args.input_batches, "input_pipeline": section}
    device = report["device"]
    title = (f"Input pipeline (streamed ImageNet), {device['platform']} ({device['kind']}), {device['cpu_count']} "
             f"CPU cores, median of {args.rounds} rounds (pipeline: of the batches below; step: of {args.steps} "
             f"steps), {report['date']}")
    write_report(args.out, report, f"{title}\n\n`{report['command']}`\n\n{format_input_report(section)}\n")

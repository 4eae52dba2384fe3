"""``dreamportrait`` console entry point.

    dreamportrait info                          versions, usable backends, CUDA architectures
    dreamportrait import-eg3d NETWORK.pkl OUT   convert an EG3D network pickle (no code from it runs)
    dreamportrait train CONFIG.yaml [k=v ...]   SDS-on-distribution training (torchrun for several GPUs)
    dreamportrait generate --prompt P ...       a 3D portrait per prompt and seed: views, depth, video, mesh
    dreamportrait baseline --prompt P ...       the per-prompt SDS baseline (one scene optimised per prompt)
    dreamportrait world build --out DIR         the synthetic world's datasets, judge and teacher
    dreamportrait world train --out DIR         its 3D GAN, then DreamPortrait trained from it
    dreamportrait evaluate --method M ...       text alignment, consistency, diversity, world-FID, speed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The library's defaults, from a module that imports no torch, so every command's --help stays fast.
from dreamportrait.defaults import BASELINE_STEPS, LEARN_WORDS_CANONICAL_WEIGHT, TRUNCATION_PSI, WORLD_CONFIG


def _info(args: argparse.Namespace) -> int:
    import torch

    import dreamportrait
    from dreamportrait import _extension
    from dreamportrait.ops import _backend

    status = _extension.status()
    cuda_visible = torch.cuda.is_available()
    triton_ok = _backend.triton_importable()
    print(f"dreamportrait {dreamportrait.__version__}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_visible else []
    print(f"GPUs          {', '.join(devices) if devices else 'none visible'}")
    if status.available:
        if status.has_cuda:
            sass = ", ".join(f"sm_{a}" for a in status.cuda_archs)
            ptx = ", ".join(f"compute_{a}" for a in status.cuda_ptx_archs) or "none (no newer GPU can run it)"
            print(f"extension     {status.origin}; CUDA SASS for: {sass}; PTX for: {ptx}")
        else:
            print(f"extension     {status.origin}; CUDA code for: none (built without CUDA)")
        vectors = {64: "AVX-512", 32: "AVX2 with FMA", 16: "SSE2 (no AVX2 or not x86-64)"}
        print(f"CPU kernels   {vectors.get(status.cpu_vector_bytes, 'unknown')} "
              f"({status.cpu_vector_bytes}-byte vectors)")
    else:
        print("extension     unavailable:")
        for line in (status.error or "").splitlines():
            print(f"                {line}")
    rows = [
        ("reference", True, "PyTorch; any device"),
        ("cpu", status.available, "C++ kernels on CPU tensors"),
        ("cuda", status.available and status.has_cuda and cuda_visible,
         "CUDA kernels" + ("" if cuda_visible else " (no GPU visible)")),
        ("triton", triton_ok and (cuda_visible or _backend.triton_interpreted()),
         "Triton kernels" + ("" if cuda_visible else "; CPU tensors only under TRITON_INTERPRET=1")),
    ]
    print("backends:")
    for name, usable, what in rows:
        print(f"  {name:<10} {'usable' if usable else 'unusable':<9} {what}")
    _print_vocabulary()
    return 0


def _print_vocabulary() -> None:
    """The words the packaged generator's text encoder reads (generate warns about others)."""
    import textwrap

    from dreamportrait.world.assets import generator_vocabulary

    try:
        words = generator_vocabulary()
    except (OSError, ValueError) as error:
        print(f"vocabulary    unavailable: {error}")
        return
    print("vocabulary    the packaged generator's prompts read these words (and one-letter words):")
    print(textwrap.fill(", ".join(words), width=100, initial_indent="  ", subsequent_indent="  "))


def _import_eg3d(args: argparse.Namespace) -> int:
    import pickle

    from dreamportrait.models.pretrained import import_eg3d

    try:
        out = import_eg3d(args.network, args.out_dir)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        print(f"dreamportrait import-eg3d: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out} (config.json + safetensors weights)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dreamportrait.training import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (OSError, ValueError) as error:
        print(f"dreamportrait train: {error}", file=sys.stderr)
        return 2
    return _run_training(config, "train")


def _run_training(config, command: str) -> int:
    """Train (resuming the run's newest checkpoint unless resume=false); tear down torchrun's group.
    A missing or damaged input (a model, the image folder, a checkpoint) is one line and exit status 1."""
    from dreamportrait.training import Trainer

    try:
        trainer = Trainer(config)
        if config.resume and trainer.resume():
            print(f"resumed at step {trainer.step} from {config.out_dir}")
        trainer.train()
    except (OSError, ValueError) as error:
        print(f"dreamportrait {command}: {error}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from dreamportrait.generation import generate, parse_seeds
    from dreamportrait.models.pretrained import load_pretrained
    from dreamportrait.world.assets import model_directory

    try:
        seeds = parse_seeds(args.seeds)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.checkpoint:
            generator, _ = load_pretrained(model_directory(args.checkpoint), device=device,
                                           text_encoder=args.text_encoder)
        else:
            from dreamportrait.world.assets import load_default_generator

            generator = load_default_generator(device)
        result = generate(generator, args.prompt, seeds, args.out, views=args.views, video=args.video, mesh=args.mesh,
                          truncation_psi=args.truncation, mesh_level=args.mesh_level,
                          mesh_resolution=args.mesh_resolution)
    except (OSError, ValueError) as error:
        print(f"dreamportrait generate: {error}", file=sys.stderr)
        return 2
    seconds = sum(result.seconds_per_sample) / len(result.seconds_per_sample)
    print(f"wrote {len(result.files)} files to {args.out}; {seconds:.3f} s per (prompt, seed) forward pass "
          f"with {args.views} views")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    import torch

    from dreamportrait.baselines import optimise_scene, write_baseline
    from dreamportrait.guidance import StableDiffusionGuidance

    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        guidance = StableDiffusionGuidance(args.guidance, guidance_scale=args.guidance_scale, device=device)
        result = optimise_scene(guidance, args.prompt, steps=args.steps, batch_size=args.batch_size,
                                render_resolution=args.resolution, lr=args.lr, seed=args.seed)
    except (OSError, ValueError) as error:
        print(f"dreamportrait baseline: {error}", file=sys.stderr)
        return 2
    out = write_baseline(result, args.out, args.prompt, args.steps, views=args.views, resolution=args.resolution)
    print(f"optimised {args.steps} steps in {result.seconds:.1f} s; wrote {out}")
    return 0


def _world_build(args: argparse.Namespace) -> int:
    import json

    from dreamportrait.world.build import build_world

    try:
        report = build_world(args.out, setting=args.setting, seed=args.seed, captions=args.captions)
    except (OSError, ValueError) as error:
        print(f"dreamportrait world build: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report["judge_accuracy_held_out"], indent=2))
    print(f"wrote {args.out}/report.json")
    return 0


def _world_learn_words(args: argparse.Namespace) -> int:
    from dreamportrait.world.assets import PACKAGED, model_directory
    from dreamportrait.world.new_words import REPORT, learn_words

    try:
        text_encoder = args.text_encoder
        if text_encoder is not None and text_encoder.startswith(PACKAGED):
            text_encoder = model_directory(text_encoder)
        report = learn_words(model_directory(args.checkpoint), args.out, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, canonical_weight=args.canonical_weight,
                             seed=args.seed, text_encoder=text_encoder)
    except (OSError, ValueError) as error:
        print(f"dreamportrait world learn-words: {error}", file=sys.stderr)
        return 2
    print(f"learnt {len(report['words_learnt'])} words in {report['seconds']:.0f} s (distillation loss "
          f"{report['distillation_loss_first_100']:.4f} -> {report['distillation_loss_last_100']:.4f}); wrote "
          f"{args.out} ({REPORT})")
    return 0


def _world_train(args: argparse.Namespace) -> int:
    from dreamportrait.world.train import prepare_run

    try:
        config = prepare_run(args.out, args.config, teacher=args.teacher, gan=args.gan, gan_steps=args.gan_steps,
                             gan_real=args.gan_real, setting=args.setting, overrides=args.overrides, seed=args.seed,
                             captions=args.captions)
    except (OSError, ValueError) as error:
        print(f"dreamportrait world train: {error}", file=sys.stderr)
        return 2
    status = _run_training(config, "world train")
    if status == 0:
        print(f"trained {config.out_dir}; generate with --checkpoint {config.out_dir}")
    return status


def _evaluate(args: argparse.Namespace) -> int:
    from dreamportrait.generation import parse_seeds
    from dreamportrait.world.comparison import compare
    from dreamportrait.world.evaluate import markdown_table

    out, name = Path(args.out), args.name or args.method
    try:
        checkpoints = args.baseline_checkpoints
        if checkpoints is not None:
            checkpoints = [int(step) for step in checkpoints.split(",") if step.strip()]
        result = compare(args.method, out, prompts=args.prompt or (), held_out=args.held_out,
                         seeds=parse_seeds(args.seeds), views=args.views, name=name, judge=args.judge, real=args.real,
                         real_count=args.real_count, device=args.device, checkpoint=args.checkpoint,
                         guidance=args.guidance, config=args.config, baseline_steps=args.baseline_steps,
                         baseline_checkpoints=checkpoints, truncation=args.truncation, prompt_set=args.prompt_set)
    except (OSError, ValueError) as error:
        print(f"dreamportrait evaluate: {error}", file=sys.stderr)
        return 2
    print(markdown_table([result]))
    print(f"wrote {out / (name + '.json')}; {out / 'results.md'} tabulates every method in {out}")
    return 0


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a prompt must have words (an empty one would render an unconditional head)")
    return text


def _add_info(commands) -> None:
    """``dreamportrait info``."""
    info = commands.add_parser("info", help="versions, usable backends and CUDA architectures of the extension")
    info.set_defaults(run=_info)


def _add_import_eg3d(commands) -> None:
    """``dreamportrait import-eg3d``."""
    convert = commands.add_parser(
        "import-eg3d", help="convert an EG3D network pickle (G_ema, D) to safetensors + JSON config, safely",
        description="Reads NETWORK.pkl with a restricted unpickler (tensors, arrays and plain containers only; "
                    "the code embedded in EG3D pickles is never executed) and writes OUT_DIR/config.json, "
                    "generator.safetensors and discriminator.safetensors.")
    convert.add_argument("network", metavar="NETWORK.pkl", help="EG3D network pickle, e.g. ffhq512-128.pkl")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    convert.set_defaults(run=_import_eg3d)


def _add_train(commands) -> None:
    """``dreamportrait train``."""
    train = commands.add_parser(
        "train", help="train the text-conditioned generator by SDS on a distribution + GAN regulariser",
        description="Reads CONFIG.yaml (see configs/), applies key=value overrides (e.g. optim.lr_base=0 "
                    "guidance.source=DIR), resumes from the run's newest checkpoint unless resume=false, and "
                    "trains with progress bars, TensorBoard logs and atomic checkpoints in out_dir. Under "
                    "torchrun it trains with DistributedDataParallel.")
    train.add_argument("config", metavar="CONFIG.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(run=_train)


def _add_generate(commands) -> None:
    """``dreamportrait generate``."""
    gen = commands.add_parser(
        "generate", help="generate 3D portraits for prompts: multi-view grid, views, depth maps, video, mesh",
        description="One forward pass of the text-conditioned generator per (prompt, seed), then renders of its "
                    "tri-planes from --views cameras (grid.png, viewNN.png, viewNN_depth.png), optionally a "
                    "turntable video (--video) and a mesh (--mesh), under OUT/<prompt>/seedNNNN/.")
    gen.add_argument("--checkpoint", default=None,
                     help="a model directory (config.json), a training run directory (its newest checkpoint) or "
                          "packaged:NAME, a model that ships (packaged:no-gan-regulariser: the generator's ablation "
                          "without the GAN regulariser); default: the packaged generator trained in the synthetic "
                          "world")
    gen.add_argument("--prompt", action="append", required=True, type=_prompt, help="a prompt; repeat for several")
    gen.add_argument("--seeds", default="0-3", help="seeds, e.g. 0-3 or 0,5,9 (default 0-3)")
    gen.add_argument("--views", type=int, default=8, help="views per sample in the grid (default 8)")
    gen.add_argument("--video", action="store_true", help="also write a turntable MP4 per sample")
    gen.add_argument("--mesh", action="store_true", help="also write a PLY mesh per sample (marching cubes)")
    gen.add_argument("--mesh-level", type=float, default=10.0, help="density of the mesh surface (default 10, EG3D's)")
    gen.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid size (default 128)")
    gen.add_argument("--truncation", type=float, default=TRUNCATION_PSI,
                     help=f"truncation psi (default {TRUNCATION_PSI}; 1 = none)")
    gen.add_argument("--text-encoder", default=None, help="text encoder source, if not the one the model recorded")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--out", required=True, help="output directory")
    gen.set_defaults(run=_generate)


def _add_baseline(commands) -> None:
    """``dreamportrait baseline``."""
    base = commands.add_parser(
        "baseline", help="per-prompt SDS baseline: optimise one tri-plane scene for one prompt",
        description="DreamFusion-style optimisation of one scene (tri-planes + decoder) with the same renderer and "
                    "guidance; writes scene.safetensors, views and timing.json to OUT.")
    base.add_argument("--prompt", required=True, type=_prompt)
    base.add_argument("--guidance", required=True, help="diffusers model directory or hub id")
    base.add_argument("--steps", type=int, default=BASELINE_STEPS,
                      help=f"optimisation steps (default: the baseline's, {BASELINE_STEPS})")
    base.add_argument("--batch-size", type=int, default=1, help="views per step (default 1)")
    base.add_argument("--resolution", type=int, default=32, help="render resolution (default 32)")
    base.add_argument("--lr", type=float, default=0.01)
    base.add_argument("--guidance-scale", type=float, default=7.5)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--views", type=int, default=8)
    base.add_argument("--device", default=None)
    base.add_argument("--out", required=True)
    base.set_defaults(run=_baseline)


def _add_world(commands) -> None:
    """``dreamportrait world`` and its subcommands."""
    world = commands.add_parser("world", help="the synthetic portrait world").add_subparsers(dest="world_command",
                                                                                             required=True)
    _add_world_build(world)
    _add_world_train(world)
    _add_world_learn_words(world)


def _add_world_build(world) -> None:
    """``dreamportrait world build``."""
    build = world.add_parser(
        "build", help="render datasets, train the judge and the teacher (resumable)",
        description="Renders the world's datasets, trains the attribute judge and the text-to-image teacher into "
                    "OUT (each stage resumes where an interrupted build stopped) and writes OUT/report.json.")
    build.add_argument("--out", required=True)
    build.add_argument("--setting", default="default", choices=["default", "tiny"],
                       help="'tiny' takes a minute (tests); 'default' is the full build")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--captions", choices=["canonical", "paraphrase"], default="canonical",
                       help="the teacher's training captions: the world's canonical phrasings (default; the packaged "
                            "teacher's) or mostly paraphrases as people write them, with a tokenizer that holds "
                            "their words")
    build.set_defaults(run=_world_build)


def _add_world_train(world) -> None:
    """``dreamportrait world train``."""
    wtrain = world.add_parser(
        "train", help="train the world's 3D GAN, then DreamPortrait from it with the world teacher (resumable)",
        description="Renders 64² training images, trains the text-free 3D GAN on them (OUT/gan/final), writes the "
                    "training captions (OUT/prompts.txt) and trains DreamPortrait from the GAN by SDS with the "
                    "teacher + GAN regularisation (OUT/dreamportrait, a `dreamportrait train` run). Every stage "
                    "resumes. KEY=VALUE overrides apply to CONFIG (e.g. gan.weight=0 out_dir=OUT/no-gan for an "
                    "ablation that reuses the GAN).")
    wtrain.add_argument("--out", required=True)
    wtrain.add_argument("--config", default=WORLD_CONFIG, help="the DreamPortrait config (default: configs/world.yaml)")
    wtrain.add_argument("--teacher", default=None, help="the teacher's directory (default: the packaged teacher)")
    wtrain.add_argument("--setting", default="default", choices=["default", "tiny"],
                        help="'tiny' runs every stage for a step or two (tests)")
    wtrain.add_argument("--gan-steps", type=int, default=None,
                        help="steps of the 3D GAN stage (default: the setting's; 3000); giving the step a run has "
                             "reached ends that stage there")
    wtrain.add_argument("--gan", default=None,
                        help="start DreamPortrait from this pretrained 3D GAN directory instead of training one "
                             "('packaged': the 3D GAN that ships in the package)")
    wtrain.add_argument("--gan-real", choices=["pretrained", "renders"], default="renders",
                        help="what the GAN regulariser takes as real portraits: the GAN stage's 64² world renders, "
                             "exported as an EG3D image folder to OUT/data/gan-train-images (default; how the "
                             "packaged generator was trained), or samples of the pretrained 3D GAN")
    wtrain.add_argument("--seed", type=int, default=0)
    wtrain.add_argument("--captions", choices=["canonical", "paraphrase"], default="canonical",
                        help="the training prompts: the canonical phrasings (default; the packaged generator's) or "
                             "those and paraphrases as people write them (OUT/prompts-paraphrase.txt), which need a "
                             "--teacher built with `world build --captions paraphrase`")
    wtrain.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    wtrain.set_defaults(run=_world_train)


def _add_world_learn_words(world) -> None:
    """``dreamportrait world learn-words``."""
    learn = world.add_parser(
        "learn-words", help="teach a trained world generator the words of captions as people write them",
        description="Widens the generator's text encoder's closed vocabulary to every word of the world's paraphrase "
                    "captions and trains the text encoder by distillation through the frozen "
                    "generator: a paraphrase must give what a canonical caption of the same head gives, while "
                    "canonical captions keep their reading. Only the text encoder is trained; the generator's weights "
                    "are copied. Writes a model directory to OUT (about 12 min on two CPU cores).")
    learn.add_argument("--checkpoint", required=True,
                       help="the generator: a model directory, training run or packaged:NAME")
    learn.add_argument("--text-encoder", default=None,
                       help="the text encoder it was trained with, if not the one it holds or records: a directory "
                            "or packaged:teacher (the packaged teacher's, which the packaged generator was trained "
                            "with before it learnt the paraphrases' words)")
    learn.add_argument("--out", required=True, help="a new directory for the model")
    learn.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    learn.add_argument("--batch-size", type=int, default=16, help="captions per step (default 16)")
    learn.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    learn.add_argument("--canonical-weight", type=float, default=LEARN_WORDS_CANONICAL_WEIGHT,
                       help="weight of the term keeping canonical captions' reading "
                            f"(default {LEARN_WORDS_CANONICAL_WEIGHT})")
    learn.add_argument("--seed", type=int, default=0)
    learn.set_defaults(run=_world_learn_words)


def _add_evaluate(commands) -> None:
    """``dreamportrait evaluate``."""
    ev = commands.add_parser(
        "evaluate", help="measure a prompt -> 3D method in the synthetic world with the judge",
        description="Renders --views views per (prompt, seed) with the method, judges them and writes "
                    "OUT/NAME.json, an image grid per prompt under OUT/NAME/, and OUT/results.md: a Markdown table "
                    "of every method evaluated into OUT.")
    ev.add_argument("--method", choices=["generator", "gan", "baseline", "world"], required=True,
                    help="generator: DreamPortrait (--checkpoint, default the packaged one); gan: a text-free 3D GAN "
                         "(--checkpoint, default the packaged one; text alignment is then chance level); baseline: "
                         "per-prompt SDS; world: the world's own renders of each prompt's head (a perfect method: the "
                         "ceiling of every metric)")
    ev.add_argument("--checkpoint",
                    help="a model directory, training run or packaged:NAME (packaged:no-gan-regulariser: the "
                         "generator's ablation without the GAN regulariser) (--method generator or gan)")
    ev.add_argument("--guidance", help="the per-prompt baseline's guidance model (default: the packaged teacher)")
    ev.add_argument("--config", default=None,
                    help="the training config whose guidance settings the baseline uses (default: configs/world.yaml)")
    ev.add_argument("--baseline-steps", type=int, default=None,
                    help=f"baseline steps per prompt (default: the baseline's, {BASELINE_STEPS})")
    ev.add_argument("--baseline-checkpoints", default=None,
                    help="also judge the baseline after these step counts, e.g. 250,1000,4000 (its progress curve)")
    ev.add_argument("--prompt", action="append", type=_prompt, help="a prompt; repeat for several")
    ev.add_argument("--held-out", type=int, default=0,
                    help="add captions of N held-out combinations spread over the list (74 = all)")
    ev.add_argument("--prompt-set", default="canonical",
                    help="where --held-out takes its prompts from: 'canonical' (the combinations' captions, "
                         "default) or 'paraphrase' (the held-out paraphrase test set: the same combinations in words "
                         "and templates no training caption uses); each prompt is scored against its own attributes")
    ev.add_argument("--seeds", default="0-3")
    ev.add_argument("--views", type=int, default=4)
    ev.add_argument("--truncation", type=float, default=None,
                    help=f"truncation psi of --method generator or gan (default {TRUNCATION_PSI}, generate's; "
                         "1 = none, as FID and diversity are usually measured)")
    ev.add_argument("--judge", default=None, help="the judge's directory (default: the packaged judge)")
    ev.add_argument("--real", default=None,
                    help="a rendered dataset directory for world-FID (default: --real-count renders of the prompts' "
                         "attribute combinations)")
    ev.add_argument("--real-count", type=int, default=1024, help="renders for world-FID without --real (1024)")
    ev.add_argument("--name", default=None, help="the method's name in the table (default: --method)")
    ev.add_argument("--device", default=None)
    ev.add_argument("--out", required=True)
    ev.set_defaults(run=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamportrait", description="DreamPortrait: text-guided 3D-aware portraits.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_info, _add_import_eg3d, _add_train, _add_generate, _add_baseline, _add_world,
                        _add_evaluate):
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""``dreamportrait`` console entry point.

    dreamportrait info                          versions, usable backends, CUDA architectures
    dreamportrait import-eg3d NETWORK.pkl OUT   convert an EG3D network pickle (no code from it runs)
    dreamportrait train CONFIG.yaml [k=v ...]   SDS-on-distribution training (torchrun for several GPUs)
"""

from __future__ import annotations

import argparse
import sys


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
        archs = ", ".join(f"sm_{a}" for a in status.cuda_archs) or "none (built without CUDA)"
        print(f"extension     {status.origin}; CUDA code for: {archs}")
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
    return 0


def _import_eg3d(args: argparse.Namespace) -> int:
    import pickle

    from dreamportrait.models import import_eg3d

    try:
        out = import_eg3d(args.network, args.out_dir)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        print(f"dreamportrait import-eg3d: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out} (config.json + safetensors weights)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dreamportrait.training import Trainer, load_config

    try:
        config = load_config(args.config, args.overrides)
    except (OSError, ValueError) as error:
        print(f"dreamportrait train: {error}", file=sys.stderr)
        return 2
    trainer = Trainer(config)
    if config.resume and trainer.resume():
        print(f"resumed at step {trainer.step} from {config.out_dir}")
    trainer.train()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamportrait", description="DreamPortrait: text-guided 3D-aware portraits.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, usable backends and CUDA architectures of the extension")
    info.set_defaults(run=_info)
    convert = commands.add_parser(
        "import-eg3d", help="convert an EG3D network pickle (G_ema, D) to safetensors + JSON config, safely",
        description="Reads NETWORK.pkl with a restricted unpickler (tensors, arrays and plain containers only; "
                    "the code embedded in EG3D pickles is never executed) and writes OUT_DIR/config.json, "
                    "generator.safetensors and discriminator.safetensors.")
    convert.add_argument("network", metavar="NETWORK.pkl", help="EG3D network pickle, e.g. ffhq512-128.pkl")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    convert.set_defaults(run=_import_eg3d)
    train = commands.add_parser(
        "train", help="train the text-conditioned generator by SDS on a distribution + GAN regulariser",
        description="Reads CONFIG.yaml (see configs/), applies key=value overrides (e.g. optim.lr_base=0 "
                    "guidance.source=DIR), resumes from the run's newest checkpoint unless resume=false, and "
                    "trains with progress bars, TensorBoard logs and atomic checkpoints in out_dir. Under "
                    "torchrun it trains with DistributedDataParallel.")
    train.add_argument("config", metavar="CONFIG.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

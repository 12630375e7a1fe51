"""Hand a trained model to other tools: safetensors weights, TorchScript or ONNX.

- safetensors: the state_dict, and in the metadata the architecture (model name and options)
  and `loads_into`, the library call that builds the same network: e.g.
  `torchvision.models.resnet50(num_classes=N)`, `timm.create_model('seresnet50', num_classes=N)`,
  this project's `build_model` for CIFAR ResNets and for ffcv's BlurPool (no library has it).
- torchscript: a traced module taking normalised NCHW float batches (torch.jit is deprecated
  upstream but still what C++ and older serving stacks load).
- onnx: PyTorch's exporter (dynamo), batch dimension dynamic; checked against PyTorch with
  onnxruntime when that is installed.

`--out` is a new file or an existing regular file you may write, never the checkpoint itself,
a link, a device or a FIFO; the result is renamed into place, with the mode a new file gets
under the umask (an existing file keeps its own).

The input every format expects is what evaluation feeds: `size` x `size` after its resize and
centre crop, normalised by the mean/std in the printed summary.

    python -m imagenet_resnet.export --checkpoint runs/x/best.pt --format safetensors --out resnet50.safetensors
    python -m imagenet_resnet.export --checkpoint runs/x/best.pt --format onnx --out resnet50.onnx --weights ema
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import torch

from imagenet_resnet.checkpoint import WEIGHTS
from imagenet_resnet.cli import command, existing_file, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import replacing
from imagenet_resnet.inference import Trained, load_trained

ONNX_TOLERANCE = 1e-4  # max |logit difference| from PyTorch, as a fraction of the largest |logit|


def export_safetensors(trained: Trained, example: torch.Tensor, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trained.net.state_dict().items()}
    model = trained.cfg.model
    architecture = {"model": model.name, "in_chans": trained.channels, "drop_path": model.drop_path,
                    "blurpool": model.blurpool}
    save_file(state, str(out), metadata={
        "model": model.name, "architecture": json.dumps(architecture), "loads_into": trained.loads_into,
        "num_classes": str(len(trained.names)), "weights": trained.weights,
        "class_names": json.dumps(trained.names), "input_size": str(example.shape[-1]),
        "mean": json.dumps(trained.mean), "std": json.dumps(trained.std),
    })


def export_torchscript(trained: Trained, example: torch.Tensor, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.trace(trained.net, example).save(str(out))


def export_onnx(trained: Trained, example: torch.Tensor, out: Path) -> None:
    try:
        import onnx  # noqa: F401  (the dynamo exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(f"--format onnx needs the onnx and onnxscript packages ({err.name} is missing): "
                        f"pip install 'imagenet-resnet[export]'") from err
    program = torch.onnx.export(trained.net, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    program.save(str(out))
    check_onnx(trained, out)


def check_onnx(trained: Trained, path: Path) -> None:
    """Compare onnxruntime's logits with PyTorch's on random inputs, if onnxruntime is installed."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: the ONNX file was not run", flush=True)
        return
    images = torch.randn(3, trained.channels, trained.size, trained.size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        want = trained.net(images)
    difference = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    if difference > ONNX_TOLERANCE:
        raise UserError(f"{path}: onnxruntime's logits differ from PyTorch's by {difference:.2g} of the largest "
                        f"(tolerance {ONNX_TOLERANCE:g}); the export is not usable")
    print(f"onnxruntime matches PyTorch: max logit difference {difference:.2g} of the largest", flush=True)


EXPORTERS = {"safetensors": export_safetensors, "torchscript": export_torchscript, "onnx": export_onnx}


def main(argv: list[str] | None = None) -> None:
    p = command(__spec__.name, "Export a trained checkpoint as safetensors, TorchScript or ONNX.")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="a best.pt or last.pt written by training")
    p.add_argument("--format", required=True, choices=tuple(EXPORTERS), help="the file format to write")
    p.add_argument("--out", required=True, type=Path, help="the file to write")
    p.add_argument(
        "--weights", choices=tuple(WEIGHTS), default="model", help="ema: the averaged weights, if trained with them"
    )
    args = p.parse_args(argv)
    mode = output_mode(args.out, args.checkpoint)
    trained = load_trained(args.checkpoint, args.weights)
    example = torch.zeros(1, trained.channels, trained.size, trained.size)
    # Written beside --out under a new name, then renamed: a failed export leaves no file that looks finished.
    partial_name = args.out.with_name(f".{args.out.name}.partial")
    try:
        with replacing(args.out, tmp=partial_name, mode=mode) as partial, torch.no_grad():
            EXPORTERS[args.format](trained, example, partial)
    except OSError as err:
        raise UserError(f"--out {args.out}: could not write ({err.strerror or err})") from err
    print(
        f"wrote {args.out}: {trained.cfg.model.name} ({trained.weights} weights), {len(trained.names)} classes, "
        f"input {trained.channels}x{trained.size}x{trained.size} normalised with mean {trained.mean} "
        f"std {trained.std}; "
        f"the same network as {trained.loads_into}",
        flush=True,
    )


def output_mode(out: Path, checkpoint: Path) -> int:
    """The mode to give the exported file; UserError unless `out` is a new name in an existing
    folder, or an existing regular file that may be written and is not the checkpoint."""
    if out.is_symlink():
        raise UserError(
            f"--out {out}: is a symbolic link; give the file's own path (export does not write through links)"
        )
    if not out.exists():
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
    st = out.stat()
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"--out {out}: is a folder; expected a file name")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"--out {out}: is not a regular file (a device, FIFO or socket); give a file name")
    if os.path.samefile(out, checkpoint):
        raise UserError(f"--out {out}: is the checkpoint being exported; give another file name")
    if not st.st_mode & 0o222 or not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: is read-only; make it writable or give another file name")
    return stat.S_IMODE(st.st_mode)


if __name__ == "__main__":
    run_main(main)

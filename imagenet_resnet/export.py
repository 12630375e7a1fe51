"""Hand a trained model to other tools: safetensors weights, TorchScript or ONNX.

- safetensors: the state_dict under the keys of the torchvision/timm model of that name, so
  `torchvision.models.resnet50(num_classes=N).load_state_dict(load_file(f))` or
  `timm.create_model("seresnet50", num_classes=N)` loads it strictly (CIFAR ResNets: this
  project's `build_model`); the metadata names the model, the classes and the source.
- torchscript: a traced module taking normalised NCHW float batches (torch.jit is deprecated
  upstream but still what C++ and older serving stacks load).
- onnx: PyTorch's exporter (dynamo), batch dimension dynamic; checked against PyTorch with
  onnxruntime when that is installed.

The input every format expects is what evaluation feeds: `size` x `size` after its resize and
centre crop, normalised by the mean/std in the printed summary.

    python -m imagenet_resnet.export --checkpoint runs/x/best.pt --format safetensors --out resnet50.safetensors
    python -m imagenet_resnet.export --checkpoint runs/x/best.pt --format onnx --out resnet50.onnx --weights ema
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch

from imagenet_resnet.cli import existing_file, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.inference import WEIGHTS, Trained, load_trained

ONNX_TOLERANCE = 1e-4  # max |logit difference| from PyTorch, as a fraction of the largest |logit|


def export_safetensors(trained: Trained, example: torch.Tensor, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trained.net.state_dict().items()}
    save_file(state, str(out), metadata={
        "model": trained.cfg.model.name, "num_classes": str(len(trained.names)), "weights": trained.weights,
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
    p = argparse.ArgumentParser(description="Export a trained checkpoint as safetensors, TorchScript or ONNX.")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="a best.pt or last.pt written by training")
    p.add_argument("--format", required=True, choices=tuple(EXPORTERS))
    p.add_argument("--out", required=True, type=Path, help="the file to write")
    p.add_argument("--weights", choices=tuple(WEIGHTS), default="model", help="ema: the averaged weights, if trained with them")
    args = p.parse_args(argv)
    if args.out.is_dir():
        raise UserError(f"--out {args.out}: is a folder; expected a file name")
    if not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist")
    trained = load_trained(args.checkpoint, args.weights)
    example = torch.zeros(1, trained.channels, trained.size, trained.size)
    tmp = args.out.with_name(f".{args.out.name}.partial")  # a failed export leaves no file that looks finished
    try:
        with torch.no_grad():
            EXPORTERS[args.format](trained, example, tmp)
        os.replace(tmp, args.out)
    except OSError as err:
        raise UserError(f"--out {args.out}: could not write ({err.strerror or err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.out}: {trained.cfg.model.name} ({trained.weights} weights), {len(trained.names)} classes, "
          f"input {trained.channels}x{trained.size}x{trained.size} normalised with mean {trained.mean} std {trained.std}",
          flush=True)


if __name__ == "__main__":
    run_main(main)

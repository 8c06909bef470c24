"""The ``timm-epsa`` command: convert checkpoints, export them for inference runtimes, publish them
on the Hub, describe the variants, and the quickstart that trains one.

Each subcommand is an ``_add_<name>`` function that declares its arguments and the function that
runs it; listing one in ``COMMANDS`` adds it to the command. This module only parses arguments and
prints: the work is done in :mod:`timm_epsa.hub` (convert, push, info, card), :mod:`timm_epsa.deploy`
(export), :mod:`timm_epsa.models.measure` and :mod:`timm_epsa.quickstart`. Every line it prints
but a model card goes through :func:`~timm_epsa.escaping.one_line`, so that no path, checkpoint or
Hub answer in it can add a line or drive the terminal. Errors a user can act on print as one line
and exit with status 1; Ctrl-C and SIGTERM stop a command alike, with one line and status 130 or 143.
Output read by a reader that stops early (``timm-epsa info | head -1``) ends the command quietly with
status 141, as SIGPIPE ends a Unix tool; a command started with stdout closed (``>&-``) is refused
before any work, with one line and status 1.
"""
import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence

from huggingface_hub.errors import HfHubHTTPError
from timm.models import get_pretrained_cfg, list_models, split_model_name_tag

from . import __version__
from .deploy import RUNTIMES, ExportError
from .deploy.export import OPENVINO_FILES, export
from .deploy.graph_export import ExportReport
from .deploy.forms import OPENVINO
from .deploy.precision import BF16, FP32, INT8, PRECISIONS
from .deploy.runtimes import default_precision
from .escaping import one_line, shell_command
from .hub import PretrainedWeightsError, cached_weights
from .hub.cards import render_model_card
from .hub.checkpoint import MIN_EXPORT_SIDE, CheckpointError, NonFiniteWeightsError
from .hub.convert import convert_checkpoint
from .hub.folder import HubFolderError
from .hub.publish import push_folder
from .hub.repos import NAMESPACE_ENV, check_repo_id, hub_namespace, hub_repo_id
from .models.epsanet import MODEL_NAMES, check_model_name
from .models.measure import measure_model
from .quickstart import DEFAULT_OUTPUT, QuickstartError, Recipe, run_quickstart

__all__ = ['COMMANDS', 'main']

# What a user can fix: shown as one line, not a traceback.
USER_ERRORS = (
    CheckpointError, ExportError, HubFolderError, PretrainedWeightsError, QuickstartError, HfHubHTTPError, OSError,
    ValueError,
)


def _model_name(value: str) -> str:
    """A variant's name, or ``<name>.<tag>`` for one of its pretrained tags (kept as given)."""
    try:
        return check_model_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _path(value: str) -> str:
    """A path given on the command line: an empty one (an unset shell variable) would name the current folder."""
    if not value:
        raise argparse.ArgumentTypeError('an empty path; give the name of a file or folder')
    return value


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number; give a percentage between 0 and 100') from None
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f'{value} is not a percentage between 0 and 100')
    return number


def _at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` (to ``maximum``)."""
    def whole_number(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{value!r} is not a whole number') from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f'{value} is less than {minimum}')
        if maximum is not None and number > maximum:
            raise argparse.ArgumentTypeError(f'{value} is more than {maximum}')
        return number
    return whole_number


def _say(message: str) -> None:
    """One line of a command's result, on stdout."""
    print(one_line(message))


def _log(message: str) -> None:
    """One line of progress, on stderr."""
    print(one_line(message), file=sys.stderr, flush=True)


def _suggest_push(folder: str, repo_id: str) -> None:
    """The command that publishes a folder just written, quoted to be pasted into a shell; where the
    folder's path cannot be shown as it is, a command naming another path would be wrong: say so."""
    command = shell_command('timm-epsa', 'push', folder, repo_id)
    if command is None:
        _say(f'publish it with timm-epsa push, the folder as your shell spells it, and {repo_id} (its path holds '
             f'characters that cannot be shown here as a command)')
    else:
        _say(f'publish it with: {command}')


def _add_card_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--top1', type=_percent, metavar='PCT', help='ImageNet-1k validation top-1 accuracy, percent')
    parser.add_argument('--top5', type=_percent, metavar='PCT', help='ImageNet-1k validation top-5 accuracy, percent')
    parser.add_argument(
        '--repo-id', metavar='REPO',
        help="the Hub repo the card is for, which its usage examples name and push checks (default: "
             "<namespace>/<model>.in1k, where pretrained=True looks)")


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert',
        help='turn a training checkpoint into a Hub-ready folder',
        description='Write OUT_DIR with model.safetensors, timm\'s config.json and a README.md model card, from a '
                    'checkpoint of the official main.py, of timm\'s train.py, a bare state dict or a safetensors '
                    'file. Pickles are read with torch.load(weights_only=True): one that would run code is '
                    'refused. The result is loaded back and compared with the source before it replaces OUT_DIR.',
    )
    parser.add_argument('src', type=_path, metavar='SRC', help='checkpoint file (.pth, .pth.tar, .bin or .safetensors)')
    parser.add_argument('out_dir', type=_path, metavar='OUT_DIR',
                        help='folder to write; must be empty or absent unless --force')
    parser.add_argument('--model', required=True, type=_model_name, metavar='NAME',
                        help=f"the architecture the weights are for: {', '.join(MODEL_NAMES)}")
    parser.add_argument('--ema', action='store_true', help="convert the EMA weights (train.py's state_dict_ema)")
    parser.add_argument('--force', action='store_true',
                        help='replace a non-empty OUT_DIR, once the new folder is complete')
    parser.add_argument('--allow-nonfinite', action='store_true',
                        help='convert weights holding inf or nan as they are (refused otherwise)')
    parser.add_argument('--ignore-train-args', action='store_true',
                        help="leave out the training arguments a timm train.py checkpoint records: config.json then "
                             "gets the model's default preprocessing, the card no training command")
    _add_card_args(parser)
    parser.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> None:
    try:
        result = convert_checkpoint(
            args.src, args.out_dir, split_model_name_tag(args.model)[0],
            ema=args.ema, force=args.force, top1=args.top1, top5=args.top5, repo_id=args.repo_id,
            allow_nonfinite=args.allow_nonfinite, ignore_train_args=args.ignore_train_args, log=_log,
        )
    except NonFiniteWeightsError as e:  # the one command that can keep them
        raise NonFiniteWeightsError(f'{e}, or pass --allow-nonfinite to convert it as it is') from None
    _say(f'wrote {result.path}: {result.model_name}, {result.facts.params / 1e6:.2f}M params, '
         f'{len(result.checkpoint.state_dict)} tensors, verified')
    _suggest_push(str(result.path), result.repo_id)


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'push',
        help='upload a converted folder to the Hugging Face Hub',
        description='Upload a folder written by `timm-epsa convert` to REPO_ID, creating the repo if needed. '
                    'The token comes from `hf auth login` or HF_TOKEN. Prints the commit to pin.',
    )
    parser.add_argument('out_dir', type=_path, metavar='OUT_DIR', help='folder written by timm-epsa convert')
    parser.add_argument('repo_id', metavar='REPO_ID', help='<user or organisation>/<name>, e.g. me/epsanet50.in1k')
    parser.add_argument('--private', action='store_true',
                        help='create the repo private (an existing repo keeps its visibility)')
    parser.add_argument('--revision', metavar='BRANCH', help='push to this branch (created if needed) instead of main')
    parser.set_defaults(run=_push)


def _push(args: argparse.Namespace) -> None:
    commit = push_folder(args.out_dir, args.repo_id, private=args.private, revision=args.revision)
    _say(f'pushed {commit.commit_url}')
    _say(f"pin this commit: timm.create_model('hf-hub:{args.repo_id}@{commit.oid}', pretrained=True)")


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'info',
        help='variants, their size, and where their pretrained weights are expected',
        description='List the EPSANet variants (or NAME) with parameters and MACs, their pretrained tags, the Hub '
                    'repo each one loads from and whether its weights are in the local Hub cache.',
    )
    parser.add_argument('name', nargs='?', type=_model_name, metavar='NAME',
                        help='one variant, e.g. epsanet50, or one of its tags, e.g. epsanet50.in1k')
    parser.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> None:
    namespace = hub_namespace()
    rows = [('model', 'params (M)', 'GMACs', 'input', 'pretrained tag', 'Hub repo', 'local cache')]
    for name in [split_model_name_tag(args.name)[0]] if args.name else MODEL_NAMES:
        facts = measure_model(name)
        for tagged in list_models(name, include_tags=True):
            if args.name not in (None, name, tagged):
                continue
            repo_id = get_pretrained_cfg(tagged).hf_hub_id
            rows.append(tuple(map(one_line, (
                name, f'{facts.params / 1e6:.2f}', f'{facts.macs / 1e9:.2f}', 'x'.join(map(str, facts.input_size[1:])),
                tagged, repo_id or 'none published', (cached_weights(repo_id) or 'not cached') if repo_id else '-',
            ))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _say('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
    _say('')
    _say(f"Hub namespace: {namespace} (set {NAMESPACE_ENV} to load your own published weights). "
         f"timm.create_model('<model>', pretrained=True) downloads the repo's model.safetensors; where none "
         f"is published it fails and says how to publish your own (timm-epsa convert, timm-epsa push).")


def _add_card(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'card',
        help="print a variant's model card",
        description='Print the README.md model card of NAME with its measured figures, as convert writes it but '
                    'without a checkpoint to describe; hub_cards/ holds these for the four variants.',
    )
    parser.add_argument('name', type=_model_name, metavar='NAME', help='e.g. epsanet50')
    _add_card_args(parser)
    parser.set_defaults(run=_card)


def _card(args: argparse.Namespace) -> None:
    name, tag = split_model_name_tag(args.name)
    sys.stdout.write(render_model_card(
        name,
        check_repo_id(args.repo_id) if args.repo_id else hub_repo_id(name, **({'tag': tag} if tag else {})),
        measure_model(name),
        get_pretrained_cfg(args.name).to_dict(),
        top1=args.top1,
        top5=args.top5,
    ))


def _add_quickstart(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'quickstart',
        help='train EPSANet-50 on handwritten digits on a CPU, write it as a Hub folder and load it back',
        description='Train epsanet50 from random initialisation on scikit-learn\'s handwritten digits (1,797 8x8 '
                    'images, upsampled; 360 held out) with timm\'s loader, transforms, optimizer, scheduler and loss; '
                    'write it to the output folder as timm-epsa convert does (model.safetensors, config.json, '
                    'a model card with the accuracy), load it back with pretrained=True and check it computes '
                    'exactly what was trained. The last line is the reloaded model\'s held-out accuracy. '
                    'Deterministic for a given seed and number of threads.',
    )
    recipe = Recipe()
    parser.add_argument('--output', type=_path, default=DEFAULT_OUTPUT, metavar='DIR',
                        help=f'folder to write; must be empty or absent unless --force (default: ./{DEFAULT_OUTPUT})')
    parser.add_argument('--epochs', type=_at_least(1), default=recipe.epochs, metavar='N',
                        help=f'training epochs (default: {recipe.epochs})')
    parser.add_argument('--img-size', type=_at_least(8, 1024), default=recipe.img_size, metavar='PX',
                        help=f'side the 8x8 digits are upsampled to, 8 to 1024 (default: {recipe.img_size})')
    parser.add_argument('--seed', type=_at_least(0, 2 ** 32 - 1), default=recipe.seed, metavar='N',
                        help=f'random seed, 0 to 2**32-1 as numpy takes it (default: {recipe.seed})')
    parser.add_argument('--train-images', type=_at_least(1), metavar='N',
                        help='train on the first N training images only, for a smoke test (default: all 1,437); '
                             'accuracy is still measured on all 360 held-out images')
    parser.add_argument('--imagefolder', type=_path, metavar='DIR',
                        help='also write the digits as an ImageFolder tree, DIR/train/<class>/*.png and '
                             'DIR/validation/<class>/*.png, for timm\'s train.py')
    parser.add_argument('--force', action='store_true',
                        help='replace a non-empty output folder or ImageFolder, once the new one is complete')
    parser.set_defaults(run=_quickstart)


def _quickstart(args: argparse.Namespace) -> None:
    recipe = Recipe(epochs=args.epochs, img_size=args.img_size, seed=args.seed, train_images=args.train_images)
    result = run_quickstart(args.output, recipe, imagefolder=args.imagefolder, force=args.force, log=_log)
    _say(f'wrote {result.path}: loads back with identical held-out logits')
    _suggest_push(str(result.path), result.repo_id)
    _say(f'held-out accuracy: {result.reloaded_accuracy:.4f}')


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'export',
        help='export a model for ONNX Runtime or OpenVINO, checked against PyTorch',
        description='Write SOURCE for a CPU inference runtime, in the graph form measured fastest there (the same '
                    'function: PSA\'s branches regrouped, BatchNorm folded; see docs/deploy.md): an ONNX file at OUT '
                    'for onnxruntime, a folder OUT holding model.xml and model.bin (OpenVINO IR, fp32) for openvino. '
                    'The runtime runs the result on a real-sized input and must match eager PyTorch within 1e-4 of '
                    'each image\'s spread of outputs before OUT appears. Needs the deploy extra: pip install '
                    '"timm-epsa[deploy]".',
    )
    parser.add_argument('source', type=_path, metavar='SOURCE',
                        help='a model name (random weights, e.g. epsanet50), a folder written by convert or quickstart, '
                             'or a checkpoint file')
    parser.add_argument('out', type=_path, metavar='OUT',
                        help='the .onnx file (onnxruntime) or the IR folder (openvino) to write')
    parser.add_argument('--runtime', required=True, choices=RUNTIMES, help='the runtime to export for')
    parser.add_argument('--batch-size', type=_at_least(1, 4096), metavar='N',
                        help='fix the batch size (default: dynamic, any batch size)')
    parser.add_argument('--img-size', type=_at_least(MIN_EXPORT_SIDE, 4096), metavar='PX',
                        help="side of the square input images (default: the model's, 224 for ImageNet weights)")
    parser.add_argument('--model', type=_model_name, metavar='NAME',
                        help='for a checkpoint SOURCE: the architecture (default: the one a timm train.py checkpoint '
                             'records)')
    parser.add_argument('--ema', action='store_true', help="for a checkpoint SOURCE: its EMA weights")
    parser.add_argument('--ignore-train-args', action='store_true',
                        help="for a checkpoint SOURCE: leave out the training arguments a timm train.py checkpoint "
                             "records (the input size then is the model's default)")
    parser.add_argument('--precision', choices=PRECISIONS, default=FP32,
                        help='what the file is tuned and checked for (default: fp32): bf16 for openvino (compile it '
                             'with INFERENCE_PRECISION_HINT bf16), int8 for both (needs --calibration)')
    parser.add_argument('--calibration', type=_path, metavar='DIR',
                        help='for int8: images like those the model will see (an ImageFolder tree or a flat folder, '
                             'at least 150), preprocessed as the model\'s eval transform; some are held out to check '
                             'the int8 model\'s predictions against fp32')
    parser.add_argument('--no-tune', dest='tune', action='store_false',
                        help='take the fixed PSA branch forms instead of timing them on this machine (the timings '
                             'are cached, so only the first export per machine, runtime and precision takes long)')
    parser.add_argument('--force', action='store_true', help='replace an existing OUT, once the new one is checked')
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> None:
    result = export(
        args.source, args.out, args.runtime,
        batch_size=args.batch_size, img_size=args.img_size, model_name=args.model, ema=args.ema,
        ignore_train_args=args.ignore_train_args, force=args.force, log=_log, precision=args.precision,
        calibration=args.calibration, tune=args.tune,
    )
    report = result.report
    files = ' and '.join(f'{result.path}/{name}' for name in OPENVINO_FILES) if report.runtime == OPENVINO \
        else str(result.path)
    batch = f'batch {report.batch_size}' if report.batch_size else 'dynamic batch'
    checked = ' and '.join(map(str, report.checked_batch_sizes))
    compared = ("the spread of the features before the classifier (its outputs are the same for every input, "
                "which shows nothing)") if report.features_checked else "the outputs' spread"
    _say(f"wrote {files}: {result.model_name} ({result.source}) for {report.runtime}, input "
         f"{'x'.join(map(str, report.input_size))}, {batch}; checked at batch {checked}, largest difference from "
         f"eager PyTorch {report.max_error:.1e} of {compared}")
    _say(_runs_as(report))


def _runs_as(report: ExportReport) -> str:
    """The precision the runtime will run the file in, and what to pass for it."""
    forms = 'PSA branch forms ' + ('timed on this CPU' if report.tuned else 'from the fixed rules')
    if report.precision == INT8:
        return (f'int8 ({report.runs_in}): top-1 class as eager fp32 for {report.agreement:.1%} of {report.held_out} '
                f'held-out images; {forms}')
    if report.precision == BF16:
        return (f"bf16: compile it with {{'INFERENCE_PRECISION_HINT': 'bf16'}} (OpenVINO ran it in {report.runs_in} "
                f"here, largest difference from eager fp32 {report.precision_error:.1e} of the outputs' spread); "
                f"{forms}")
    if report.runtime == OPENVINO:
        default = default_precision(OPENVINO)
        return ("fp32: compile it with {'INFERENCE_PRECISION_HINT': 'f32'}" + (
            f"; OpenVINO's default on this CPU is {default} (export --precision bf16 for that)" if default != 'f32'
            else '') + f'; {forms}')
    return f'fp32; {forms}'


COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    _add_quickstart, _add_convert, _add_export, _add_push, _add_info, _add_card,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-epsa',
        description='EPSANet for timm: train one on handwritten digits (quickstart), convert training '
                    'checkpoints to Hub-ready safetensors folders, publish them on the Hugging Face Hub, and '
                    'describe the variants.',
    )
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves sys.stdout None
        # Refused before any work, unlike a reader that stops early (which wanted no more): here
        # every result line would be lost, and a quiet success would hide it.
        print(f'timm-epsa {args.command}: error: standard output is closed, so its result could not be shown; run '
              f'it with stdout open (>/dev/null to discard the result)', file=sys.stderr)
        return 1
    try:
        with _sigterm_as_interrupt():
            args.run(args)
            sys.stdout.flush()  # here, where a reader that has gone can still be told from an error
    except BrokenPipeError:  # whoever read the output stopped (`| head`): nothing to say, as a Unix tool
        _discard_output()
        return 128 + signal.SIGPIPE  # the shell's status for a tool SIGPIPE ends
    except USER_ERRORS as e:
        print(f'timm-epsa {args.command}: error: {one_line(str(e))}', file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"timm-epsa {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # the shell's status for the signal
    return 0


def _discard_output() -> None:
    """Point stdout and stderr at the null device, so that what Python still flushes at exit into the
    closed pipe raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):  # a stream replaced by one without a file descriptor
            pass
    os.close(devnull)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


def _raise_terminated(signum: int, frame) -> None:
    raise _Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a command inside the block as Ctrl-C stops it: cleaning up, with one line. Only
    the main thread can handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

if __name__ == '__main__':
    sys.exit(main())

"""Offline subcommands on routing-outcome data: ``fit``, ``score``, ``classify`` and ``eval``.

``register(subparsers)`` adds them to the ``routesvc`` command line; each handler takes the
parsed arguments and returns an exit code. Progress bars go to stderr (tqdm, when installed).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from routesvc.encoders import DEFAULT_ROUTER_ENCODER, WordLlamaEncoder, load_encoder
from routesvc.errors import RouteSvcError
from routesvc.evaluation import (
    RoutingCurve,
    RoutingReport,
    evaluate_scores,
    pair_data,
    plot_curves,
    plot_format,
    require_plotting,
    routing_curve,
)
from routesvc.fitting import FitError, FitSettings, FittedRouter, fit_router, model_alias
from routesvc.outcomes import OutcomeRecord, iter_outcomes, read_outcomes
from routesvc.strategies.classifier import TaskClassifier, read_examples


def _progress(items: Iterable[int], total: int, description: str) -> Iterable[int]:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the default install
    except ImportError:
        return items
    bar: Iterable[int] = tqdm(items, total=total, desc=description, unit="batch", file=sys.stderr)
    return bar


def _weight(text: str) -> float:
    """A finite, non-negative number (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a finite number, 0 or more")
    return value


def _neighbours(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of neighbours must be at least 1")
    return value


def _finite(text: str) -> float:
    """A finite number (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _output_file(path: Path) -> Path:
    """Where ``path`` is written: the file a symlink names (the link is kept, as ``fit`` keeps a
    link to its folder), else ``path``."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError in Python 3.11, OSError later
        raise OSError(errno.ELOOP, "cannot resolve the path (a symlink loop?)", str(path)) from exc


def _special_file(path: Path) -> bool:
    """Whether ``path`` (symlinks followed, ``/dev/stdout``'s too) is an existing file that is
    neither a regular file nor a folder: a device (``/dev/null``), a FIFO, a pipe, a socket."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _check_out(path: Path) -> None:
    """``_check_writable`` for a ``--out`` file, unless it is a device or a pipe (written straight)."""
    if not _special_file(path):
        _check_writable(_output_file(path))


def _write_jsonl(path: Path, rows: Iterable[dict[str, object]]) -> int:
    """Write ``rows`` to ``path`` (the file it links to, for a symlink) whole or not at all: into
    a new file of a name no other writer uses beside it, then renamed over it (a failure part way,
    a full disk, left a cut file where a good one may have been; a fixed name let two writers to
    one ``path`` write into one file, and the first to finish move the other's into place).

    A ``path`` that is a device, a FIFO or a pipe (``/dev/null``, ``/dev/stdout``) is written
    straight: a file renamed over it replaced the device or the FIFO with a regular file (as
    root, ``--out /dev/null`` left every later ``> /dev/null`` writing into a file), and
    ``/dev/stdout`` into a pipe failed, its link naming no file."""
    if _special_file(path):
        with _writing(path), open(path, "w", encoding="utf-8") as handle:
            return _write_rows(handle, rows)
    target = _output_file(path)
    partial: Path | None = None
    try:
        with _writing(path):
            target.parent.mkdir(parents=True, exist_ok=True)
            while partial is None:
                candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
                try:  # O_EXCL, as mkstemp, with the permissions the umask gives a new file (not 0600)
                    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    continue
                partial = candidate
            with open(fd, "w", encoding="utf-8") as handle:
                count = _write_rows(handle, rows)
            os.replace(partial, target)
    except BaseException:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    return count


def _write_rows(handle: TextIO, rows: Iterable[dict[str, object]]) -> int:
    """Write ``rows`` to ``handle``, one JSON object a line; how many."""
    count = 0
    for row in rows:
        handle.write(json.dumps(row) + "\n")
        count += 1
    return count


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name ``path`` (the output asked for) in an ``OSError`` raised while writing it: a full disk
    said only "No space left on device", or named a temporary file beside it."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _check_writable(path: Path, *, parents: bool = True, folder_out: bool = False) -> None:
    """Fail in a moment rather than after minutes of fitting or scoring: a file can be made in
    the folder ``path`` is (or would be) written in, or, when the writer makes missing folders
    (``parents``), in its nearest existing parent. ``path`` names a file to write, or with
    ``folder_out`` a folder to write into."""
    if path.is_dir() and not folder_out:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    folder = path if path.is_dir() else path.parent
    while parents and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(folder))
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


# Below this mean quality gap between the pair, PGR is a ratio of noise (docs/routing-quality.md).
_SMALL_GAP = 0.05
ROUTER_FILES = frozenset({"router.json", "library.npz"})


def _check_router_out(out: Path) -> None:
    """Refuse an ``--out`` (resolved) that ``_save_whole`` would not replace safely: a regular
    file, a folder holding anything besides a router's two files (replacing the folder would
    delete it), or the current folder or one holding it (replacing it pulls the folder the shell
    is in from under it: ``fit --out .`` from inside a router folder)."""
    if out.exists() and not out.is_dir():
        raise FitError(f"--out {out}: not a folder (fit writes router.json and library.npz into one)")
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise FitError(f"--out {out}: is the current folder or holds it; fit replaces the folder whole: give another")
    others = sorted(entry.name for entry in out.iterdir() if entry.name not in ROUTER_FILES) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FitError(
            f"--out {out}: holds files other than a router's ({shown}); fit replaces the folder whole:"
            " give a new folder, or one written by fit"
        )


def _save_whole(router: FittedRouter, out: Path) -> None:
    """Write ``router`` to the folder ``out`` (resolved, as ``_check_router_out`` checked it)
    whole or not at all.

    Both files go into a new folder beside ``out``, which is then renamed into place: a failure
    while writing (a full disk) leaves the old router as it was, where writing into ``out`` left
    new weights beside the old library. An existing ``out`` is first renamed aside (one rename
    cannot replace a folder), then removed; a crash between those two renames leaves no ``out``,
    the old router in ``.NAME.old-*`` and the new one in ``.NAME.new-*`` beside it. Should another
    fit's router land on ``out`` between those two renames, it is kept and this one is not: the
    old one is removed and the fit fails.
    """
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    new, old = out.with_name(f".{out.name}.new-{token}"), out.with_name(f".{out.name}.old-{token}")
    out.parent.mkdir(parents=True, exist_ok=True)
    new.mkdir()
    try:
        router.save(new)
        try:
            if out.exists():
                out.rename(old)
            new.rename(out)
        except OSError as exc:
            # Another fit into the same --out renamed its folder there (or aside) meanwhile.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
            raise FitError(f"--out {out}: changed while fitting (another fit wrote it?); not replaced") from exc
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if old.exists():
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)  # another fit's router is in place: it stays
            else:
                old.rename(out)  # the new one could not be moved in: put the old one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_prompts(path: Path) -> list[OutcomeRecord]:
    return list(iter_outcomes(path))


def run_fit(args: argparse.Namespace) -> int:
    """``routesvc fit``: fit a router for the pair and write it to ``--out``."""
    started = time.perf_counter()
    # Resolved once, and every check and the swap on that path: "build/../models" with no build
    # passed the check as given (nothing there), then replaced the real models folder. A symlink
    # to a folder: the folder it names is replaced, the link kept.
    try:
        out = args.out.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError in Python 3.11, OSError later
        raise FitError(f"--out {args.out}: cannot resolve the path: {exc}") from exc
    _check_router_out(out)
    # The router is written beside --out, then renamed into place: its folder must take files.
    _check_writable(out.parent if out.is_dir() else out, folder_out=out.is_dir())
    encoder = load_encoder(args.encoder)  # an unknown name fails before the data is read
    records = read_outcomes(*args.data)
    print(f"read {len(records)} prompts from {len(args.data)} path(s)", file=sys.stderr)
    settings = FitSettings(
        neighbours=args.neighbours,
        prior_weight=args.prior_weight,
        proxy_weight=args.proxy_weight,
        kind_weight=args.kind_weight,
    )
    router = fit_router(records, args.strong, args.weak, encoder, settings, progress=_progress, require_pair=True)
    for usage in router.usage:
        print(f"  {usage.describe()}", file=sys.stderr)
    for usage in router.usage:
        if usage.kind != "skipped" and 0 <= usage.labelled < _FEW_LABELLED_SHARE * usage.prompts:
            print(
                f"warning: {usage.source}: only {usage.labelled} of its {usage.prompts} prompts are labelled"
                f" ({usage.rule}): the file's other prompts teach the router nothing",
                file=sys.stderr,
            )
    _warn_unfit_pair(records, router)
    if router.kind_offset:
        kinds = ", ".join(settings.strong_kinds)
        spreads = f"{settings.kind_weight:g} score spread{'' if settings.kind_weight == 1 else 's'}"
        print(f"  kind prior: +{router.kind_offset:.4f} ({spreads}) for {kinds}", file=sys.stderr)
    with _writing(args.out):
        _save_whole(router, out)
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


# Fewer prompts with the pair than this, and the router's gap model rests on a handful of examples.
_FEW_PAIR_PROMPTS = 50
# A file labelled on under this share of its prompts: fit warns (the rest of the file is unused).
_FEW_LABELLED_SHARE = 0.1


def _warn_unfit_pair(records: list[OutcomeRecord], router: FittedRouter) -> None:
    """Warn (stderr; the router is still written) when the prompts labelled with the pair cannot
    teach a useful router: too few of them, or the strong model not better than the weak one on
    them (its difficulty term then sends hard prompts to the worse model)."""
    pairs = {u.source: (u.strong, u.weak) for u in router.usage if u.kind == "pair"}
    strong, weak = [], []
    for record in records:
        pair = pairs.get(record.source)
        if pair is not None and record.has_pair(*pair):
            strong.append(record.outcomes[pair[0]])
            weak.append(record.outcomes[pair[1]])
    if len(strong) < _FEW_PAIR_PROMPTS:
        print(
            f"warning: only {len(strong)} {'prompt has' if len(strong) == 1 else 'prompts have'} outcomes for both"
            f" {router.strong} and {router.weak}: a router fitted on under {_FEW_PAIR_PROMPTS} ranks prompts by"
            " little more than chance",
            file=sys.stderr,
        )
    if not strong:
        return
    _warn_small_gap(
        router.strong,
        router.weak,
        sum(strong) / len(strong),
        sum(weak) / len(weak),
        on="the fitted prompts",
        if_none="the router sends the prompts it finds hard to a model that is no better",
        if_small="the router learns mostly noise",
    )


def _warn_small_gap(
    strong: str, weak: str, strong_quality: float, weak_quality: float, *, on: str, if_none: str, if_small: str
) -> None:
    """Warn (stderr) when ``strong`` does not beat ``weak`` ``on`` some prompts (``if_none`` says
    what follows), or beats it by under ``_SMALL_GAP`` (``if_small``)."""
    gap = strong_quality - weak_quality
    if gap <= 0:
        print(
            f"warning: {strong} does not beat {weak} on {on} ({strong_quality:.4f} vs {weak_quality:.4f}): {if_none}",
            file=sys.stderr,
        )
    elif gap < _SMALL_GAP:
        print(f"warning: {strong} beats {weak} by only {gap:.4f} on {on}: {if_small}", file=sys.stderr)


def run_score(args: argparse.Namespace) -> int:
    """``routesvc score``: one ``{"source", "id", "score"}`` per prompt (higher = prefer the strong
    model); ``source`` is the file's name without ``.jsonl``, since files of a folder may share ids."""
    router = FittedRouter.load(args.router)
    _check_out(args.out)
    records = _read_prompts(args.data)
    scores = router.scores([r.prompt for r in records], progress=_progress)
    rows = ({"source": r.source, "id": r.id, "score": round(float(s), 6)} for r, s in zip(records, scores, strict=True))
    count = _write_jsonl(args.out, rows)
    print(f"wrote {count} scores to {args.out}", file=sys.stderr)
    return 0


def run_classify(args: argparse.Namespace) -> int:
    """``routesvc classify``: one ``{"source", "id", "task"}`` per prompt from the local task
    classifier (``source`` as in ``score``)."""
    _check_out(args.out)
    classifier = TaskClassifier(WordLlamaEncoder(), read_examples(args.examples))
    records = _read_prompts(args.data)
    labels: list[str] = []
    chunk = 512
    for start in _progress(range(0, len(records), chunk), -(-len(records) // chunk), "classifying"):
        labels.extend(p.task for p in classifier.predict_many([r.prompt for r in records[start : start + chunk]]))
    rows: Iterable[dict[str, object]] = (
        {"source": r.source, "id": r.id, "task": t} for r, t in zip(records, labels, strict=True)
    )
    count = _write_jsonl(args.out, rows)
    print(f"wrote {count} labels to {args.out}", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``routesvc eval``: APGR, CPT(50%), CPT(80%), AIQ and savings of a router on one data set."""
    router = FittedRouter.load(args.router)
    if (model_alias(args.strong), model_alias(args.weak)) != (model_alias(router.strong), model_alias(router.weak)):
        print(
            f"warning: the router was fitted for {router.strong} - {router.weak}, not {args.strong} -"
            f" {args.weak}: its scores rank prompts by the fitted pair's gap",
            file=sys.stderr,
        )
    if args.plot:
        require_plotting()
        _check_writable(args.plot, parents=False)
        plot_format(args.plot)  # a format matplotlib writes: before the work
    records = _read_prompts(args.data)
    pair = pair_data(records, args.strong, args.weak)
    for source in pair.sources:
        print(f"  {source.describe()}", file=sys.stderr)
    if pair.without_cost:
        print(
            f"warning: {pair.without_cost} of {len(pair.ids)} prompts have no cost_usd for both models (the first:"
            f" {pair.first_without_cost}): AIQ and the savings need every prompt's, so they are left out",
            file=sys.stderr,
        )
    scores = router.scores(pair.prompts, progress=_progress)
    report = evaluate_scores(scores, pair.strong, pair.weak, pair.strong_cost, pair.weak_cost)
    _warn_small_gap(
        args.strong,
        args.weak,
        report.strong_quality,
        report.weak_quality,
        on="this data",
        if_none="APGR and CPT measure how much of a gap is recovered, and there is none here",
        if_small="APGR and CPT divide by that gap, so they are mostly noise here",
    )
    # The metrics first: a plot that cannot be written (a full disk) must not lose them.
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        _print_report(report, args.strong, args.weak)
    if args.plot:
        curves: dict[str, RoutingCurve] = {
            "router": routing_curve(scores, pair.strong, pair.weak),
            "oracle": routing_curve(pair.strong - pair.weak, pair.strong, pair.weak),
        }
        sys.stdout.flush()
        with _writing(args.plot):
            plot_curves(curves, args.plot, f"{args.data.name}: {args.strong} vs {args.weak}")
    return 0


def _print_report(report: RoutingReport, strong: str, weak: str) -> None:
    rows = [
        ("prompts", f"{report.prompts}"),
        (f"quality {strong}", f"{report.strong_quality:.4f}"),
        (f"quality {weak}", f"{report.weak_quality:.4f}"),
        ("APGR (random 0.5)", f"{report.apgr:.4f}  (oracle {report.oracle_apgr:.4f})"),
        ("CPT(50%)", f"{report.cpt50:.1%} strong calls"),
        ("CPT(80%)", f"{report.cpt80:.1%} strong calls"),
        ("AIQ", "n/a (no cost_usd)" if report.aiq is None else f"{report.aiq:.4f}"),
        ("strong share at 95% quality", f"{report.strong_share_at_95:.1%}"),
    ]
    if report.savings_at_95_usd is not None and report.cost_strong_usd:
        saved = report.savings_at_95_usd
        rows.append(
            ("saved at 95% quality", f"${saved:.6f}/prompt ({saved / report.cost_strong_usd:.1%} of always-strong)")
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _handled(handler: object) -> object:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))  # type: ignore[operator]
        except RouteSvcError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            raise  # the reader went away (`| head`): the command line exits quietly
        except OSError as exc:  # writing --out or --plot: name the path, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fit``, ``score``, ``classify`` and ``eval`` to ``subparsers``."""
    fit = subparsers.add_parser("fit", help="fit a router from routing-outcome data")
    fit.add_argument("--data", type=Path, action="append", required=True, help="outcomes file or folder (repeatable)")
    fit.add_argument("--strong", required=True, help="strong model id as named in the data")
    fit.add_argument("--weak", required=True, help="weak model id as named in the data")
    fit.add_argument("--out", type=Path, required=True, help="folder to write the router to")
    defaults = FitSettings()
    fit.add_argument(
        "--encoder",
        default=DEFAULT_ROUTER_ENCODER,
        help="local encoder: wordllama-l2-256, hashing-256, or parts joined by '+' (default: %(default)s)",
    )
    # Hidden knobs of the fit (docs/routing-quality.md): refused here when the router they give
    # would not load (its load checks neighbours and prior_weight) or its fit would not be finite.
    fit.add_argument("--neighbours", type=_neighbours, default=defaults.neighbours, help=argparse.SUPPRESS)
    fit.add_argument("--prior-weight", type=_finite, default=defaults.prior_weight, help=argparse.SUPPRESS)
    fit.add_argument("--proxy-weight", type=_weight, default=defaults.proxy_weight, help=argparse.SUPPRESS)
    fit.add_argument(
        "--kind-weight",
        type=_weight,
        default=defaults.kind_weight,
        help="score spreads added to code and multi-step reasoning prompts (0: off; default: %(default)s)",
    )
    fit.set_defaults(func=_handled(run_fit))

    score = subparsers.add_parser("score", help="score prompts with a fitted router")
    score.add_argument("--router", type=Path, required=True, help="folder written by fit")
    score.add_argument("--data", type=Path, required=True, help="outcomes (or prompts) file or folder")
    score.add_argument("--out", type=Path, required=True, help="JSONL of {source, id, score}")
    score.set_defaults(func=_handled(run_score))

    classify = subparsers.add_parser("classify", help="label prompts with the local task classifier")
    classify.add_argument("--data", type=Path, required=True, help="outcomes (or prompts) file or folder")
    classify.add_argument("--out", type=Path, required=True, help="JSONL of {source, id, task}")
    classify.add_argument("--examples", type=Path, default=None, help="JSONL of {task, prompt}; default: shipped")
    classify.set_defaults(func=_handled(run_classify))

    evaluate = subparsers.add_parser("eval", help="APGR, CPT, AIQ and savings of a router on outcome data")
    evaluate.add_argument("--router", type=Path, required=True, help="folder written by fit")
    evaluate.add_argument("--data", type=Path, required=True, help="outcomes file or folder")
    evaluate.add_argument("--strong", required=True)
    evaluate.add_argument("--weak", required=True)
    evaluate.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="draw quality against the share of strong calls into this image (format: its extension, .png, .svg...)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(func=_handled(run_eval))


def main(argv: list[str] | None = None) -> int:
    """Run the offline subcommands on their own (``python -m routesvc.offline``)."""
    parser = argparse.ArgumentParser(prog="routesvc")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

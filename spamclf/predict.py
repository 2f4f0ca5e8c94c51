r"""Classify texts with a trained checkpoint; one JSON object per input.

    python -m spamclf.predict --ckpt logs/train/runs/<run>/checkpoints/last.ckpt \
        --text "WIN a prize!" --text "see you at 5"
    python -m spamclf.predict --ckpt CKPT --input messages.csv [--text-column text] --output predictions.jsonl
    python -m spamclf.predict --onnx DIR/model.onnx --input messages.txt     # ONNX Runtime, no torch imported
    python -m spamclf.predict --ckpt CKPT --input inbox.mbox --explain      # mail, with each word's contribution

Input files are streamed in chunks, so memory stays flat however long the file is: `.txt` holds one
message per line; `.csv`/`.tsv` need a header naming the text column, except header-less
`label<TAB>text` files like the SMS collection. Mail (an `.eml`, an mbox, a Maildir or a folder of them) is read
by `spamclf.mail`; each output line then names its message under "source".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from functools import partial
from itertools import islice
from pathlib import Path

import spamclf
from spamclf.classifier import PRECISION_CHOICES
from spamclf.errors import DataError, SpamclfError
from spamclf.io import atomic_file
from spamclf.mail import is_mail_source, iter_mail
from spamclf.progress import progress_bar

csv.field_size_limit(2**31 - 1)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--ckpt or --onnx (one of them), --precision and --device (checkpoints only); `spamclf.serve` takes them too."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint written by train.py (runs with torch)")
    model.add_argument("--onnx", help="model.onnx written by `python -m spamclf.export --format onnx` "
                                      "(runs with ONNX Runtime, no torch)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="--ckpt only. auto (the default): bf16 where the CPU (AMX, AVX512-BF16) or GPU runs it "
                             "natively, else fp32 (fp16 on GPUs without bf16)")
    parser.add_argument("--device", default=None, help="--ckpt only: cpu (the default), cuda, cuda:1, mps")


def model_source(args: argparse.Namespace) -> tuple[str, dict]:
    """The model file the flags name and the options `spamclf.load` gets for it."""
    options = {name: value for name in ("precision", "device") if (value := getattr(args, name)) is not None}
    if args.onnx is not None and options:
        flag = f"--{next(iter(options))}"
        raise SpamclfError(f"{flag} applies to --ckpt only; an ONNX graph runs on the CPU at the precision it was "
                           f"exported at: drop {flag}")
    return args.ckpt or args.onnx, options


def iter_texts(path: str, text_column: str = "text", encoding: str = "utf-8") -> Iterator[str]:
    """Stream the messages of a .txt, .csv or .tsv file without reading it whole."""
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: a folder without mail (.eml files, mbox files or Maildirs); give mail, or a .txt, "
                        f".csv or .tsv file of messages, with --input")
    if not file.is_file():
        raise DataError(f"{path}: input file not found; fix --input")
    suffix = file.suffix.lower()
    try:
        fh = open(file, encoding=encoding, newline="")
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); fix its permissions or --input") from None
    except LookupError:
        raise DataError(f"--encoding {encoding}: no such text encoding; use e.g. utf-8 or latin-1") from None
    with fh:
        lines = _numbered(fh, path, encoding)
        if suffix not in (".csv", ".tsv"):
            for _, line in lines:
                yield line.rstrip("\r\n")
            return
        delimiter = "," if suffix == ".csv" else "\t"
        first = next(lines, None)
        if first is None:
            return
        header = next(csv.reader([first[1]], delimiter=delimiter))
        if text_column in header:
            column = header.index(text_column)
            for row in csv.reader((line for _, line in lines), delimiter=delimiter):
                if row:
                    yield row[column] if column < len(row) else ""
        elif delimiter == "\t":  # header-less label<TAB>text, as the SMS collection
            yield first[1].rstrip("\r\n").partition("\t")[2]
            for _, line in lines:
                yield line.rstrip("\r\n").partition("\t")[2]
        else:
            raise DataError(f"{path}:1: no column {text_column!r} in the header {header}; set --text-column")


def _numbered(fh, path: str, encoding: str) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        for lineno, line in enumerate(fh, start=1):  # noqa: B007 - read after the loop on errors
            yield lineno, line
    except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno + 1}: bytes that are not valid {encoding}; "
                        "re-save as UTF-8 or pass --encoding") from None


def chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def input_records(path: str, text_column: str, encoding: str,
                  headers: Sequence[str]) -> Iterator[tuple[str | None, str]]:
    """(source name, text) of each message of --input: mail names its messages, a text file does not."""
    if is_mail_source(path):
        return iter_mail(path, headers)
    return ((None, text) for text in iter_texts(path, text_column, encoding))


def check_input(path: str, text_column: str, encoding: str) -> None:
    """Fail at once on an --input that is missing, unreadable or of the wrong kind (a folder without mail, a CSV
    without the text column): its first message is read. Mail headers change a message's text, never whether it
    is read, so none are needed for this."""
    with closing(iter(input_records(path, text_column, encoding, ()))) as records:
        next(records, None)


def predict_stream(classifier, records: Iterable[tuple[str | None, str]], out, batch_tokens: int = 2048,
                   chunk_size: int = 4096, advance: Callable[[int], None] | None = None,
                   explain_method: str | None = None) -> int:
    """Write one JSON line per (source, text) record to `out`; returns how many. `advance(n)`: n more messages
    done. `explain_method`: add each message's per-word explanation (`spamclf.explain`)."""
    count = 0
    for chunk in chunks(records, chunk_size):
        texts = [text for _, text in chunk]
        rows = [result.as_dict() for result in classifier.predict(texts, batch_tokens=batch_tokens, progress=advance)]
        if explain_method is not None:
            from spamclf.explain import explain

            for row, explanation in zip(rows, explain(classifier, texts, method=explain_method)):
                row["explanation"] = explanation.as_dict()
        for (source, _), row in zip(chunk, rows):
            out.write(json.dumps(row if source is None else {"source": source, **row}, ensure_ascii=False) + "\n")
        if advance is not None:  # repeated texts in the chunk were classified once, counted here
            advance(len(texts) - len(set(texts)))
        count += len(chunk)
    return count


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spamclf.predict", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a message to classify (repeatable)")
    source.add_argument("--input", help=".txt (one message per line), .csv or .tsv file; or mail: an .eml, an mbox, "
                                        "a Maildir or a folder of them")
    parser.add_argument("--output", help="write JSON lines here instead of standard output")
    parser.add_argument("--text-column", default="text", help="column of --input CSV/TSV files holding the text")
    parser.add_argument("--encoding", default="utf-8")
    parser.add_argument("--batch-tokens", type=int, default=2048,
                        help="tokens per batch (short messages go many to a batch)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="messages read from --input at a time")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                        help="the same as --precision bf16")
    parser.add_argument("--explain", action="store_true",
                        help="--ckpt only: add each word's contribution to the positive class (docs/explain.md)")
    parser.add_argument("--explain-method", default=None, help="occlusion (the default) or ig (integrated gradients)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it only shows on a terminal anyway)")
    return parser.parse_args(argv)


def explain_method(args: argparse.Namespace) -> str | None:
    """The explanation method asked for, or None; an ONNX graph has no gradients or torch network to explain."""
    if not args.explain:
        if args.explain_method is not None:
            raise SpamclfError("--explain-method needs --explain: add --explain or drop --explain-method")
        return None
    if args.onnx is not None:
        raise SpamclfError("--explain needs the torch network: pass the checkpoint with --ckpt instead of --onnx")
    from spamclf.explain import DEFAULT_METHOD, METHODS

    method = args.explain_method or DEFAULT_METHOD
    if method not in METHODS:
        raise SpamclfError(f"--explain-method {method}: no such method; use one of {', '.join(METHODS)}")
    return method


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = None if args.output is None else Path(args.output)
        if target is not None and not target.parent.is_dir():
            raise DataError(f"{target.parent}: output folder does not exist; create it or fix --output")
        method = explain_method(args)
        path, options = model_source(args)
        if args.input is not None:  # before the model loads: a mistyped path fails in a second, not after the load
            check_input(args.input, args.text_column, args.encoding)
        classifier = spamclf.load(path, **options)
        precision = classifier.precision
        print(f"precision {precision.requested} -> {precision.name}: {precision.reason}", file=sys.stderr)
        headers = classifier.tokenization.get("mail_headers") or ()
        if args.text is not None:
            records, total = [(None, text) for text in args.text], len(args.text)
        else:  # one cheap pass first: the bar's total, and a bad file fails before anything is written
            total = sum(1 for _ in input_records(args.input, args.text_column, args.encoding, headers))
            records = input_records(args.input, args.text_column, args.encoding, headers)
        with progress_bar("classifying", total, enabled=not args.no_progress and args.input is not None) as advance:
            run = partial(predict_stream, classifier, records, batch_tokens=args.batch_tokens,
                          chunk_size=args.chunk_size, advance=advance, explain_method=method)
            if target is None:
                run(out=sys.stdout)
                return 0
            with atomic_file(target) as out:  # a failed run never leaves a half-written output file
                count = run(out=out)
        print(f"wrote {count} predictions to {target}", file=sys.stderr)
        return 0
    except SpamclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

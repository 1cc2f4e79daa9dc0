"""Know your data: what MiniMind SFT jsonl holds before a run trains on it.

    python -m train.data_report my.jsonl[,more.jsonl] [--max_seq_len 340] [--batch_size 32] [--eval_data held.jsonl]
                                [--tokenizer DIR] [--png lengths.png] [--json report.json]

prints: samples and bad lines (skipped, as --skip_bad_lines would); token lengths (min, p50, p90, p99, max) before
the cut; how many samples --max_seq_len cuts, and how many of those lose EVERY answer token (no supervised label
left in labels[1:], the positions the loss reads, once cut as MiniMind cuts: `ids[:max_seq_len]`); duplicate
samples (identical token sequences: the copies after the first); with --eval_data, the eval samples that are also
training samples; steps per epoch at --batch_size, and how full packed rows (train.data.SFTLoader, packed=True, rows
of packed_row_len) and padded rows of max_seq_len would be. --png draws the length histogram with max_seq_len
marked; --json writes the same numbers as JSON.

Lengths, cuts and duplicates are of each conversation as written (MiniMind's `lengths`: its empty think block kept,
no system prompt added); the random system prompt of --add_system_ratio can make a few more samples long enough to
be cut. The fills draw both augmentations as epoch 0 of a run with --seed would. Bad input (a missing or unreadable
file, no valid samples) is one `error: ...` line naming the file and exit status 1.

`summary_line(ds, max_seq_len)` is the one line the trainer logs when a run's data has a problem of this kind.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from minimind_jax.tokenizer import load_tokenizer
from train.config import REAL
from train.dataset import cut_samples, summary_line  # noqa: F401  (summary_line: the trainer's one line)
from train.data import DEFAULT_CACHE_DIR, DataError, SFTDataset, SFTLoader, load_sft_dataset, packed_row_len

UNCUT = 1 << 30  # the max_seq_len the report loads with: every sample whole
EXAMPLES = 5  # file:line examples kept per finding


# ------------------------------------------------------------------------------------------------ counting


def truncated(ds: SFTDataset, max_seq_len: int) -> SFTDataset:
    """`ds` (loaded whole, or at a longer max_seq_len) as load_sft_dataset would give it at max_seq_len: the same
    token store, read up to max_seq_len (its cut is a prefix: ids[:max_seq_len])."""
    if max_seq_len > ds.max_seq_len:
        raise ValueError(f"cannot lengthen a dataset cut at {ds.max_seq_len} to {max_seq_len}")
    cap = lambda a: np.minimum(a, max_seq_len).astype(np.int32)
    return dataclasses.replace(ds, max_seq_len=max_seq_len, keep_len=cap(ds.keep_len), drop_len=cap(ds.drop_len))


def _digests(ds: SFTDataset) -> list:
    """One digest per sample of its whole token sequence (as written: the keep variant, no system prompt)."""
    return [hashlib.blake2b(np.ascontiguousarray(ds.tokens[o : o + n]).tobytes(), digest_size=16).digest()
            for o, n in zip(ds.keep_off, ds.keep_len)]


def _percentiles(lengths: np.ndarray) -> dict:
    """min, p50, p90, p99, max: observed lengths (the smallest one with at least p% of the samples at or below)."""
    q = np.percentile(lengths, [0, 50, 90, 99, 100], method="inverted_cdf")
    return dict(zip(("min", "p50", "p90", "p99", "max"), (int(v) for v in q)))


def report(ds: SFTDataset, max_seq_len: int, batch_size: int, eval_ds: Optional[SFTDataset] = None,
           add_system_ratio: float = REAL["add_system_ratio"], empty_think_ratio: float = REAL["empty_think_ratio"],
           seed: int = 42) -> dict:
    """The report's numbers (what --json writes) for `ds` loaded whole (load_sft_dataset at UNCUT) and optionally
    eval data loaded the same way."""
    if ds.max_seq_len < UNCUT and np.any(ds.full_len > ds.max_seq_len):
        raise ValueError("report() needs the samples whole: load them with max_seq_len=data_report.UNCUT")
    n = len(ds)
    full_len = np.asarray(ds.full_len, np.int64)
    cut, answerless = cut_samples(ds, max_seq_len)
    digests = _digests(ds)
    first: dict = {}
    dups = []
    for i, d in enumerate(digests):
        if d in first:
            dups.append((i, first[d]))
        else:
            first[d] = i
    run_ds = truncated(ds, max_seq_len)
    loader = lambda **kw: SFTLoader(run_ds, batch_size, seed=seed, add_system_ratio=add_system_ratio,
                                    empty_think_ratio=empty_think_ratio, process_index=0, process_count=1, **kw)
    row_len = packed_row_len(run_ds, add_system_ratio)
    out = {
        "files": list(ds.files),
        "samples": n,
        "samples_per_file": {f: int(c) for f, c in zip(ds.files, np.bincount(ds.file_idx, minlength=len(ds.files)))},
        "bad_lines": int(ds.num_bad_lines),
        "tokens": int(full_len.sum()),
        "length": _percentiles(full_len),
        "max_seq_len": max_seq_len,
        "cut": len(cut),
        "cut_share": len(cut) / n,
        "tokens_cut": int(np.maximum(full_len - max_seq_len, 0).sum()),
        "cut_examples": [ds.source(i) for i in cut[:EXAMPLES]],
        "answerless": len(answerless),
        "answerless_examples": [ds.source(i) for i in answerless[:EXAMPLES]],
        "duplicates": len(dups),
        "duplicate_examples": [[ds.source(i), ds.source(j)] for i, j in dups[:EXAMPLES]],
        "batch_size": batch_size,
        "steps_per_epoch": -(-n // batch_size),
        "packed_row_len": row_len,
        "packed_fill": loader(packed=True, seq_len=row_len).fill_ratio(0),
        "padded_fill": loader(packed=False).fill_ratio(0),
        "add_system_ratio": add_system_ratio,
        "empty_think_ratio": empty_think_ratio,
        "seed": seed,
        "eval": None,
    }
    if eval_ds is not None:
        eval_digests = _digests(eval_ds)
        in_train = [i for i, d in enumerate(eval_digests) if d in first]
        shared = set(eval_digests) & set(first)
        out["eval"] = {
            "files": list(eval_ds.files),
            "samples": len(eval_ds),
            "bad_lines": int(eval_ds.num_bad_lines),
            "in_training": len(in_train),  # eval samples whose tokens are also a training sample's
            "training_samples_in_eval": sum(d in shared for d in digests),
            "in_training_examples": [[eval_ds.source(i), ds.source(first[eval_digests[i]])]
                                     for i in in_train[:EXAMPLES]],
        }
    return out


# ------------------------------------------------------------------------------------------------ output


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _first(examples: list, one_file: bool, k: int = 3) -> str:
    """' (first: line 9, line 50)' from file:line sources (pairs joined by ' = '); file names without their
    directories, and none at all for a single file."""
    def short(source: str) -> str:
        name, line = source.rsplit(":", 1)
        return f"line {line}" if one_file else f"{Path(name).name}:{line}"

    shown = ", ".join(" = ".join(map(short, e)) if isinstance(e, list) else short(e) for e in examples[:k])
    return f" (first: {shown})" if shown else ""


def format_report(r: dict) -> str:
    """The printed summary of `report`'s numbers."""
    n, ln = r["samples"], r["length"]
    first = lambda examples: _first(examples, len(r["files"]) == 1)
    files = ", ".join(f"{f} ({c})" for f, c in r["samples_per_file"].items()) if len(r["files"]) > 1 else r["files"][0]
    lines = [
        f"data: {files}",
        f"  samples       {n}; bad lines skipped: {r['bad_lines']}",
        f"  tokens        {r['tokens']} in all; per sample min {ln['min']}, p50 {ln['p50']}, p90 {ln['p90']}, "
        f"p99 {ln['p99']}, max {ln['max']}",
        f"  cut           {r['cut']} of {n} samples ({_pct(r['cut_share'])}) are longer than --max_seq_len "
        f"{r['max_seq_len']}: {r['tokens_cut']} tokens cut off{first(r['cut_examples'])}",
        f"  answerless    {r['answerless']} of the {r['cut']} cut samples: every answer token is past the cut"
        f"{first(r['answerless_examples'])}",
        f"  duplicates    {r['duplicates']} samples repeat an earlier one's tokens{first(r['duplicate_examples'])}",
    ]
    e = r["eval"]
    if e is not None:
        lines.append(f"  eval          {e['samples']} samples in {', '.join(e['files'])} (bad lines skipped: "
                     f"{e['bad_lines']}); {e['in_training']} of them are also training samples "
                     f"({e['training_samples_in_eval']} training samples){_first(e['in_training_examples'], False)}")
    lines.append(f"  batches       --batch_size {r['batch_size']}: {r['steps_per_epoch']} steps/epoch; fill "
                 f"{_pct(r['packed_fill'])} packed (rows of {r['packed_row_len']} tokens), "
                 f"{_pct(r['padded_fill'])} padded (rows of {r['max_seq_len']})")
    return "\n".join(lines)


def histogram_png(lengths: np.ndarray, max_seq_len: int, path, title: str = "") -> None:
    """The token-length histogram with max_seq_len marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = np.asarray(lengths)
    cut = int((lengths > max_seq_len).sum())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=min(100, max(10, len(np.unique(lengths)))), color="#4c72b0")
    ax.axvline(max_seq_len, color="#c44e52", linestyle="--",
               label=f"--max_seq_len {max_seq_len}: {cut} of {len(lengths)} cut ({cut / len(lengths) * 100:.1f}%)")
    ax.set_xlabel("tokens per sample (before the cut)")
    ax.set_ylabel("samples")
    ax.set_title(title or "SFT sample lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.data_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_path", help="SFT jsonl file(s), comma-separated")
    p.add_argument("--max_seq_len", type=int, default=340, help="tokens a sample is cut to (MiniMind's)")
    p.add_argument("--batch_size", type=int, default=REAL["batch_size"], help="samples per step")
    p.add_argument("--eval_data", default=None, help="held-out jsonl file(s), comma-separated: overlap with training")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the bundled one)")
    p.add_argument("--png", default=None, help="write the length histogram here")
    p.add_argument("--json", default=None, help="write the report's numbers here")
    p.add_argument("--add_system_ratio", type=float, default=REAL["add_system_ratio"], help="for the fills")
    p.add_argument("--empty_think_ratio", type=float, default=REAL["empty_think_ratio"], help="for the fills")
    p.add_argument("--seed", type=int, default=42, help="the fills' augmentation draws (epoch 0)")
    p.add_argument("--cache_dir", default=None, help=f"tokenized-data cache (default {DEFAULT_CACHE_DIR})")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    for flag in ("max_seq_len", "batch_size"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag} must be positive, got {getattr(args, flag)}")
    split = lambda s: [p for p in s.split(",") if p.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        read = lambda paths: load_sft_dataset(paths, tokenizer, max_seq_len=UNCUT, cache_dir=args.cache_dir,
                                              skip_bad_lines=True)
        ds = read(split(args.data_path))
        eval_ds = read(split(args.eval_data)) if args.eval_data else None
        r = report(ds, args.max_seq_len, args.batch_size, eval_ds, args.add_system_ratio, args.empty_think_ratio,
                   args.seed)
        print(format_report(r), flush=True)
        if args.png:
            histogram_png(ds.full_len, args.max_seq_len, args.png, title=", ".join(Path(f).name for f in ds.files))
            print(f"wrote {args.png}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    except (DataError, OSError) as e:  # a bad data line or file, a missing tokenizer, an unwritable output
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        raise SystemExit(f"error: {what}") from None
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
